//! The bpf(2) commands aya 0.14 does not expose, in one place for the agent, the CLI
//! and the tests crate: open a pinned object, read a link's target, swap a link's
//! program in place, detach a link, walk and look up a map by fd, query what is
//! attached to a hook, run a program on a buffer (BPF_PROG_TEST_RUN), switch the
//! kernel's run-time statistics on (BPF_ENABLE_STATS) and write many map entries with
//! one call (BPF_MAP_UPDATE_BATCH).
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use anyhow::{Context, Result};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_OBJ_PIN: libc::c_long = 6;

/// `bpf_link_type` of a cgroup link.
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;
/// `bpf_link_type` of an XDP link and of a TCX link. For both, the link info's union
/// starts with the interface index (read as the low half of [`LinkInfo::cgroup_id`]).
pub const BPF_LINK_TYPE_XDP: u32 = 6;
pub const BPF_LINK_TYPE_TCX: u32 = 11;

pub(crate) fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a properly sized, zero-padded bpf_attr prefix for `cmd`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// A `u64` socket option (`SO_COOKIE`, `SO_NETNS_COOKIE`) of `fd`.
pub fn sockopt_u64(fd: std::os::fd::BorrowedFd<'_>, opt: libc::c_int) -> io::Result<u64> {
    let mut value = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`, a live u64.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SOL_SOCKET,
            opt,
            std::ptr::from_mut(&mut value).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets `SO_RCVTIMEO` on `fd`: a blocking receive gives up with EAGAIN after `timeout`.
pub fn set_recv_timeout(
    fd: &impl std::os::fd::AsRawFd,
    timeout: std::time::Duration,
) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: a valid timeval of the size given, on a descriptor the caller owns.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens a pinned BPF object (map, program or link).
pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("pin path {} contains a NUL byte", path.display()))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd =
        bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("BPF_OBJ_GET {}", path.display()))?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The prefix of `struct bpf_link_info` we read: type, ids and, for cgroup links, the
/// cgroup id and attach type (the union starts at offset 16).
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    _pad: u32,
    pub cgroup_id: u64,
    pub attach_type: u32,
    _pad2: u32,
    _rest: [u64; 4],
}

pub fn link_info(fd: &OwnedFd) -> Result<LinkInfo> {
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<LinkInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD on a link")?;
    Ok(info)
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Atomically replaces the program behind a link: no moment without a program, which
/// is what lets a restarted agent upgrade its programs without dropping a connection.
pub fn link_update(link: &OwnedFd, new_prog_fd: i32) -> Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog_fd as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).context("BPF_LINK_UPDATE")?;
    Ok(())
}

#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
    _pad: [u32; 3],
}

/// Detaches a link even if other file descriptors or pins still hold it.
pub fn link_detach(link: &OwnedFd) -> Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_DETACH, &mut attr).context("BPF_LINK_DETACH")?;
    Ok(())
}

const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;

#[repr(C)]
#[derive(Default)]
struct IdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// Detaches every cgroup link on `cgroup_id` whose program name starts with `prefix`.
/// This finds links whose pins were removed by hand, which nothing else could reach.
pub fn detach_orphan_links(cgroup_id: u64, prefix: &str) -> Result<usize> {
    let names: std::collections::HashMap<u32, String> = aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_owned()))
        .collect();
    let mut detached = 0;
    let mut id = 0u32;
    loop {
        let mut attr = IdAttr {
            id,
            ..Default::default()
        };
        match bpf(BPF_LINK_GET_NEXT_ID, &mut attr) {
            Ok(_) => id = attr.next_id,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e).context("BPF_LINK_GET_NEXT_ID"),
        }
        let mut get = IdAttr {
            id,
            ..Default::default()
        };
        let fd = match bpf(BPF_LINK_GET_FD_BY_ID, &mut get) {
            // SAFETY: the kernel returned a new file descriptor that we now own.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd as i32) },
            // The link went away between the two calls.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e).context("BPF_LINK_GET_FD_BY_ID"),
        };
        let info = link_info(&fd)?;
        let ours = names
            .get(&info.prog_id)
            .is_some_and(|n| n.starts_with(prefix));
        if info.link_type == BPF_LINK_TYPE_CGROUP && info.cgroup_id == cgroup_id && ours {
            link_detach(&fd)?;
            detached += 1;
        }
    }
    Ok(detached)
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// `value` for a lookup, `next_key` for BPF_MAP_GET_NEXT_KEY.
    value: u64,
    flags: u64,
}

/// Looks `key` up in the map behind `map`; `None` when it is absent. `K` and `V` must
/// have the map's key and value sizes (per-CPU maps need one `V` per possible CPU).
pub fn map_lookup<K: bytemuck::Pod, V: bytemuck::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
) -> Result<Option<V>> {
    let mut value = V::zeroed();
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_mut(&mut value) as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e).context("BPF_MAP_LOOKUP_ELEM"),
    }
}

/// The `batch` member of `union bpf_attr` (BPF_MAP_*_BATCH).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// BPF_MAP_UPDATE_BATCH (Linux ≥ 5.6; hash and array maps, not LPM tries): writes the
/// `count` entries packed in `keys` and `values` (each `count` times the map's key and
/// value size) in order, as that many single updates would, with one syscall. The
/// kernel stops at the first entry it refuses; the error then carries how many entries
/// before it were written.
pub fn map_update_batch(
    map: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> std::result::Result<(), (usize, io::Error)> {
    let Ok(n) = u32::try_from(count) else {
        return Err((0, io::Error::from_raw_os_error(libc::E2BIG)));
    };
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: n,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
        Ok(_) => Ok(()),
        // The kernel writes back how many entries it processed.
        Err(e) => Err(((attr.count as usize).min(count), e)),
    }
}

/// Whether an error of [`map_update_batch`] that wrote nothing means the kernel (older
/// than 5.6: EINVAL for an unknown command) or the map type (ENOTSUPP, 524 inside the
/// kernel) has no batch updates, rather than refusing an entry.
pub fn batch_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
    )
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// BPF_MAP_CREATE's attributes up to `map_name` (Linux ≥ 4.15).
#[repr(C)]
#[derive(Default)]
struct MapCreateNamedAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// Creates a plain hash map (`BPF_MAP_TYPE_HASH`) named `name` (at most 15 bytes
/// kept, as the kernel does), for a map the agent owns and no program uses.
pub fn create_hash_map(
    name: &str,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> Result<OwnedFd> {
    const BPF_MAP_TYPE_HASH: u32 = 1;
    create_map(BPF_MAP_TYPE_HASH, name, key_size, value_size, max_entries)
}

/// Creates a map of `map_type` (`BPF_MAP_TYPE_*`) named `name`.
pub fn create_map(
    map_type: u32,
    name: &str,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> Result<OwnedFd> {
    let mut map_name = [0u8; 16];
    for (d, s) in map_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = MapCreateNamedAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_name,
        ..Default::default()
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr)
        .with_context(|| format!("BPF_MAP_CREATE of map {name} (type {map_type})"))?;
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the object behind `fd` at `path` (BPF_OBJ_PIN; `path` must be on a bpffs).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} has a NUL byte", path.display()))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).with_context(|| format!("BPF_OBJ_PIN {}", path.display()))?;
    Ok(())
}

/// One step of BPF_MAP_LOOKUP_BATCH (Linux ≥ 5.6 for hash maps): up to `count`
/// entries into `keys`/`values` (`count` times the key and value size), continuing
/// after `token` (`None`: from the start; a buffer of at least 8 bytes that the kernel
/// writes the position into). Returns how many entries came and whether the walk is
/// over. A hash map is walked bucket by bucket, so an entry that stays in the map
/// comes exactly once even while others are added and removed.
pub fn map_lookup_batch(
    map: BorrowedFd<'_>,
    token: &mut [u8; 8],
    first: bool,
    keys: &mut [u8],
    values: &mut [u8],
    count: u32,
) -> io::Result<(usize, bool)> {
    let mut out = [0u8; 8];
    let mut attr = BatchAttr {
        in_batch: if first { 0 } else { token.as_ptr() as u64 },
        out_batch: out.as_mut_ptr() as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
    let got = (attr.count as usize).min(count as usize);
    match r {
        Ok(_) => {
            *token = out;
            Ok((got, false))
        }
        // ENOENT: the walk reached the end; the last entries came with it.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok((got, true)),
        Err(e) => Err(e),
    }
}

/// Whether this kernel takes BPF_MAP_UPDATE_BATCH on a hash map: one empty batch into a
/// throw-away map. `Err` when the map cannot be created at all (no privilege).
pub fn probe_map_update_batch() -> Result<bool> {
    const BPF_MAP_TYPE_HASH: u32 = 1;
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_HASH,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        map_flags: 0,
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr).context("BPF_MAP_CREATE of a probe hash map")?;
    // SAFETY: the kernel returned a new descriptor that we now own.
    let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    Ok(map_update_batch(map.as_fd(), &[], &[], 0).is_ok())
}

/// Counts a map's keys with BPF_MAP_GET_NEXT_KEY: one syscall per entry, and it works
/// for every hash type whatever its key and value layout.
pub fn count_keys(map: BorrowedFd<'_>, key_size: usize) -> Result<u64> {
    let mut cur = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut first = true;
    let mut n = 0u64;
    loop {
        let mut attr = MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            key: if first { 0 } else { cur.as_ptr() as u64 },
            value: next.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            Err(e) => return Err(e).context("BPF_MAP_GET_NEXT_KEY"),
        }
        n += 1;
        first = false;
        std::mem::swap(&mut cur, &mut next);
    }
}

/// A map's first key by BPF_MAP_GET_NEXT_KEY (`None`: the map is empty), for any hash
/// type whatever its layout: one syscall where [`count_keys`] walks the whole map.
pub fn first_key(map: BorrowedFd<'_>, key_size: usize) -> Result<Option<Vec<u8>>> {
    get_next_key(map, 0, key_size)
}

/// BPF_MAP_GET_NEXT_KEY after the key at `key` (0: the first key) of `key_size` bytes.
fn get_next_key(map: BorrowedFd<'_>, key: u64, key_size: usize) -> Result<Option<Vec<u8>>> {
    let mut next = vec![0u8; key_size];
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key,
        value: next.as_mut_ptr() as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
        Ok(_) => Ok(Some(next)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e).context("BPF_MAP_GET_NEXT_KEY"),
    }
}

/// The key after `key` by BPF_MAP_GET_NEXT_KEY (`None`: `key` was the last). When
/// `key` is no longer in the map the kernel answers with the first key: the walk starts
/// over, so a caller may see an entry twice.
pub fn next_key<K: bytemuck::Pod>(map: BorrowedFd<'_>, key: &K) -> Result<Option<Vec<u8>>> {
    get_next_key(map, std::ptr::from_ref(key) as u64, size_of::<K>())
}

/// The `query` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    /// A cgroup's fd, or a device's interface index for TCX (a union in the kernel).
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// What BPF_PROG_QUERY found at one hook.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attached {
    /// How many programs are attached (may exceed the ids returned).
    pub count: u32,
    /// Program ids, at most the capacity asked for.
    pub prog_ids: Vec<u32>,
    /// Link ids in the same order (0 for a program attached without a link); the
    /// kernel fills them for TCX hooks only.
    pub link_ids: Vec<u32>,
}

/// BPF_PROG_QUERY: the programs at `attach_type` (enum bpf_attach_type) of `target`, a
/// cgroup's fd or, for TCX hooks, an interface index of the calling thread's network
/// namespace. Asks for at most `max_ids` ids (0: only the count).
pub fn prog_query(target: u32, attach_type: u32, max_ids: usize) -> Result<Attached> {
    let mut progs = vec![0u32; max_ids];
    let mut links = vec![0u32; max_ids];
    let mut attr = QueryAttr {
        target_fd: target,
        attach_type,
        prog_cnt: u32::try_from(max_ids).context("too many ids asked for")?,
        ..Default::default()
    };
    if max_ids > 0 {
        attr.prog_ids = progs.as_mut_ptr() as u64;
        attr.link_ids = links.as_mut_ptr() as u64;
    }
    bpf(BPF_PROG_QUERY, &mut attr)
        .with_context(|| format!("BPF_PROG_QUERY attach type {attach_type} on {target}"))?;
    let n = (attr.prog_cnt as usize).min(max_ids);
    progs.truncate(n);
    links.truncate(n);
    Ok(Attached {
        count: attr.prog_cnt,
        prog_ids: progs,
        link_ids: links,
    })
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Explicit, so the trailing padding is zero: the kernel rejects non-zero bytes
    /// past the fields it knows with EINVAL.
    _pad: u32,
}

/// The outcome of [`prog_test_run`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value (a tc or XDP verdict).
    pub retval: u32,
    /// The packet after the program, at most the capacity asked for.
    pub data_out: Vec<u8>,
    /// Mean run time per repetition, nanoseconds.
    pub duration_ns: u32,
}

/// BPF_PROG_TEST_RUN: runs the program behind `prog` `repeat` times on `data`, and
/// returns the packet as the program left it (up to `out_capacity` bytes; 0 reads
/// none back).
pub fn prog_test_run(
    prog: BorrowedFd<'_>,
    data: &[u8],
    out_capacity: usize,
    repeat: u32,
) -> Result<TestRun> {
    prog_test_run_ctx(prog, data, out_capacity, repeat, &[])
}

/// [`prog_test_run`] with a context for the program (`ctx_in`, say a `struct xdp_md`
/// naming the ingress device); empty: none.
pub fn prog_test_run_ctx(
    prog: BorrowedFd<'_>,
    data: &[u8],
    out_capacity: usize,
    repeat: u32,
    ctx: &[u8],
) -> Result<TestRun> {
    let mut out = vec![0u8; out_capacity];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: u32::try_from(data.len()).context("test packet too large")?,
        data_in: data.as_ptr() as u64,
        repeat,
        ..Default::default()
    };
    if !ctx.is_empty() {
        attr.ctx_size_in = u32::try_from(ctx.len()).context("test context too large")?;
        attr.ctx_in = ctx.as_ptr() as u64;
    }
    // Without an output buffer the pointer stays 0: the kernel copies nothing back then,
    // where a dangling pointer of an empty Vec would fail with EFAULT.
    if out_capacity > 0 {
        attr.data_size_out = u32::try_from(out_capacity).context("output buffer too large")?;
        attr.data_out = out.as_mut_ptr() as u64;
    }
    bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    out.truncate((attr.data_size_out as usize).min(out_capacity));
    Ok(TestRun {
        retval: attr.retval,
        data_out: out,
        duration_ns: attr.duration,
    })
}

#[repr(C)]
#[derive(Default)]
struct EnableStatsAttr {
    stats_type: u32,
}

/// `BPF_STATS_RUN_TIME`: per-program run count and run time.
const BPF_STATS_RUN_TIME: u32 = 0;

/// Switches the kernel's per-program run-time statistics on (BPF_ENABLE_STATS) for as
/// long as the returned descriptor lives, without touching the
/// `kernel.bpf_stats_enabled` sysctl another user may rely on.
pub fn enable_stats() -> Result<OwnedFd> {
    let mut attr = EnableStatsAttr {
        stats_type: BPF_STATS_RUN_TIME,
    };
    let fd = bpf(BPF_ENABLE_STATS, &mut attr).context("BPF_ENABLE_STATS run time")?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> Result<bool> {
    Ok(fs_type(path)? == BPF_FS_MAGIC)
}

/// Whether `path` is a cgroup v2 directory.
pub fn is_cgroup2(path: &Path) -> Result<bool> {
    Ok(fs_type(path)? == CGROUP2_SUPER_MAGIC)
}

fn fs_type(path: &Path) -> Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).context("path contains a NUL byte")?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type as i64)
}

/// Mounts bpffs at `path` (as Cilium's agent does when the host has not), mode 0700:
/// only root may reach the pins through it.
pub fn mount_bpffs(path: &Path) -> Result<()> {
    let target = CString::new(path.as_os_str().as_bytes()).context("path contains a NUL byte")?;
    let src = c"bpf";
    let data = c"mode=0700";
    // SAFETY: all pointers are valid C strings; data is null.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("mount -t bpf -o mode=0700 bpf {}", path.display()));
    }
    Ok(())
}

/// The cgroup v2 root, from /proc/self/mountinfo. Never hard-coded: hybrid hosts mount
/// it at /sys/fs/cgroup/unified, pure v2 hosts at /sys/fs/cgroup.
pub fn cgroup2_root() -> Result<std::path::PathBuf> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    cgroup2_root_from(&info).context("no cgroup2 filesystem is mounted (svc-lb needs cgroup v2)")
}

fn cgroup2_root_from(mountinfo: &str) -> Option<std::path::PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> ..."
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        (fstype == "cgroup2")
            .then(|| pre.split_whitespace().nth(4).map(std::path::PathBuf::from))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let info = "25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                    26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:7 - cgroup2 cgroup2 rw\n\
                    27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cgroup2_root_from(info),
            Some("/sys/fs/cgroup/unified".into())
        );
        assert_eq!(
            cgroup2_root_from("25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"),
            None
        );
    }

    #[test]
    fn link_info_layout_matches_kernel() {
        // type, id, prog_id, then the union at offset 16 (8-byte aligned).
        assert_eq!(std::mem::offset_of!(LinkInfo, cgroup_id), 16);
        assert_eq!(std::mem::offset_of!(LinkInfo, attach_type), 24);
    }
}
