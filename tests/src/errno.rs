//! Errno names for the client's report: tests assert on names, not numbers.
use std::io;

/// The errno name of an I/O error. Receive timeouts (EAGAIN from SO_RCVTIMEO, or the
/// TimedOut of a connect with a timeout) are all reported as `TIMEOUT`, because that is
/// what they mean here.
pub fn name(err: &io::Error) -> String {
    if matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) && err.raw_os_error() != Some(libc::ETIMEDOUT)
    {
        return "TIMEOUT".into();
    }
    match err.raw_os_error() {
        Some(code) => code_name(code),
        None => format!("{:?}", err.kind()),
    }
}

pub fn code_name(code: i32) -> String {
    let name = match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "TIMEOUT",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::EMFILE => "EMFILE",
        libc::ENOBUFS => "ENOBUFS",
        libc::EPIPE => "EPIPE",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETDOWN => "ENETDOWN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EDESTADDRREQ => "EDESTADDRREQ",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EPROTO => "EPROTO",
        _ => return format!("E{code}"),
    };
    name.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_common_errors() {
        assert_eq!(
            name(&io::Error::from_raw_os_error(libc::ECONNREFUSED)),
            "ECONNREFUSED"
        );
        assert_eq!(
            name(&io::Error::from_raw_os_error(libc::ENETUNREACH)),
            "ENETUNREACH"
        );
        assert_eq!(name(&io::Error::from_raw_os_error(libc::EAGAIN)), "TIMEOUT");
        assert_eq!(name(&io::Error::from(io::ErrorKind::TimedOut)), "TIMEOUT");
        assert_eq!(name(&io::Error::from_raw_os_error(9999)), "E9999");
    }
}
