//! `svclb-harness serve`: a backend that answers every request with its id.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::netns;

#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Network namespace to serve in (/run/netns/NAME), entered with setns.
    #[arg(long)]
    pub netns: Option<String>,
    /// The id sent back as the reply.
    #[arg(long)]
    pub name: String,
    /// TCP address to listen on (repeatable).
    #[arg(long)]
    pub tcp: Vec<SocketAddr>,
    /// UDP address to answer on (repeatable).
    #[arg(long)]
    pub udp: Vec<SocketAddr>,
    /// Accepting threads per TCP listener.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Answer `<name> <peer address>` instead of `<name>`: the peer is the source the
    /// server saw, so a test can tell whether the client's address was preserved.
    #[arg(long)]
    pub with_peer: bool,
}

/// A TCP request starting with this byte opens a long-lived session: the server answers
/// every further message (each read) with its reply and a newline until the client
/// closes, instead of one reply and a close.
pub const LONG_LIVED: u8 = b'L';

/// Binds everything, prints `ready`, then serves until killed.
pub fn serve(args: &ServeArgs) -> Result<()> {
    if args.tcp.is_empty() && args.udp.is_empty() {
        bail!("nothing to serve: give --tcp and/or --udp");
    }
    // Before any thread exists: threads inherit the namespace of their creator.
    if let Some(ns) = &args.netns {
        netns::enter_netns(ns)?;
    }
    let tcp: Vec<TcpListener> = args
        .tcp
        .iter()
        .map(|a| TcpListener::bind(a).with_context(|| format!("bind tcp {a}")))
        .collect::<Result<_>>()?;
    let udp: Vec<UdpSocket> = args
        .udp
        .iter()
        .map(|a| UdpSocket::bind(a).with_context(|| format!("bind udp {a}")))
        .collect::<Result<_>>()?;
    let reply: &'static str = Box::leak(args.name.clone().into_boxed_str());
    let with_peer = args.with_peer;
    let mut threads = Vec::new();
    for l in &tcp {
        for _ in 0..args.threads.max(1) {
            let l = l.try_clone().context("clone listener")?;
            threads.push(std::thread::spawn(move || accept_loop(l, reply, with_peer)));
        }
    }
    for s in udp {
        threads.push(std::thread::spawn(move || udp_loop(s, reply, with_peer)));
    }
    println!("ready");
    std::io::stdout().flush().context("flush stdout")?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn reply_for(reply: &str, with_peer: bool, peer: SocketAddr) -> Vec<u8> {
    if with_peer {
        format!("{reply} {peer}").into_bytes()
    } else {
        reply.as_bytes().to_vec()
    }
}

fn accept_loop(l: TcpListener, reply: &'static str, with_peer: bool) {
    loop {
        match l.accept() {
            Ok((s, peer)) => {
                // A misbehaving client must not stop the server: errors end only this
                // connection. Long-lived sessions get their own thread so they do not
                // hold an accepting thread.
                let msg = reply_for(reply, with_peer, peer);
                let _ = answer(s, msg);
            }
            Err(e) => {
                eprintln!("svclb-harness serve: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Reads the request (one byte is enough), writes the id, closes. Reading first means
/// the client's byte is consumed before the close, so the close is a FIN, not a RST.
fn answer(mut s: TcpStream, reply: Vec<u8>) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    if n > 0 && buf[0] == LONG_LIVED {
        std::thread::spawn(move || long_lived(s, reply));
        return Ok(());
    }
    s.write_all(&reply)?;
    s.shutdown(std::net::Shutdown::Write)?;
    // Wait for the client's close so its unread data (if any) cannot turn into a RST.
    let _ = s.read(&mut buf);
    Ok(())
}

/// Answers every message with `reply` and a newline until the client closes. The
/// session may idle between messages, so there is no read timeout.
fn long_lived(mut s: TcpStream, reply: Vec<u8>) -> std::io::Result<()> {
    s.set_read_timeout(None)?;
    let mut line = reply;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut buf = [0u8; 64];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&line)?;
    }
}

fn udp_loop(s: UdpSocket, reply: &'static str, with_peer: bool) {
    let mut buf = [0u8; 2048];
    loop {
        match s.recv_from(&mut buf) {
            Ok((_, from)) => {
                if let Err(e) = s.send_to(&reply_for(reply, with_peer, from), from) {
                    eprintln!("svclb-harness serve: udp reply to {from}: {e}");
                }
            }
            Err(e) => {
                eprintln!("svclb-harness serve: udp recv: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
