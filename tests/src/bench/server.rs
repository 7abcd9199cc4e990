//! The backends of every mode: `svclb-bench serve`, one process per backend namespace.
//!
//! It listens on 0.0.0.0, so one process answers on every address of its namespace (the
//! three planes' primary addresses and the hot Service's extra addresses). Each TCP
//! connection: read the 1-byte request, write the 1-byte id, close. The server closes
//! first, so TIME_WAIT stays on the server side and the client's ephemeral ports are free
//! again at once. Several threads block in accept() on the same listener; the kernel hands
//! each connection to one of them, so the backends are not the bottleneck.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    os::unix::process::CommandExt,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{netns, procs};

#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Network namespace to serve in (/run/netns/NAME).
    #[arg(long)]
    pub netns: String,
    /// The one-byte reply, which tells the client which backend answered.
    #[arg(long)]
    pub id: char,
    #[arg(long, default_value_t = super::workload::TCP_TARGET_PORT)]
    pub tcp_port: u16,
    #[arg(long, default_value_t = super::workload::UDP_TARGET_PORT)]
    pub udp_port: u16,
    /// Threads blocked in accept() on the TCP listener.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Threads answering on the UDP socket.
    #[arg(long, default_value_t = 2)]
    pub udp_threads: usize,
}

pub fn serve(args: &ServeArgs) -> Result<()> {
    if !args.id.is_ascii() {
        bail!("--id must be one ASCII character");
    }
    // Before any thread exists: threads inherit the namespace of their creator.
    netns::enter_netns(&args.netns)?;
    let any = Ipv4Addr::UNSPECIFIED;
    let tcp = TcpListener::bind((any, args.tcp_port))
        .with_context(|| format!("bind tcp 0.0.0.0:{}", args.tcp_port))?;
    let udp = UdpSocket::bind((any, args.udp_port))
        .with_context(|| format!("bind udp 0.0.0.0:{}", args.udp_port))?;
    let reply = [args.id as u8];
    let mut threads = Vec::new();
    for _ in 0..args.threads.max(1) {
        let l = tcp.try_clone().context("clone the listener")?;
        threads.push(std::thread::spawn(move || accept_loop(&l, reply)));
    }
    for _ in 0..args.udp_threads.max(1) {
        let s = udp.try_clone().context("clone the UDP socket")?;
        threads.push(std::thread::spawn(move || udp_loop(&s, reply)));
    }
    println!("ready");
    std::io::stdout().flush().context("flush stdout")?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn accept_loop(l: &TcpListener, reply: [u8; 1]) {
    loop {
        match l.accept() {
            // An error ends only this connection, never the server.
            Ok((s, _)) => {
                let _ = answer(s, reply);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn answer(mut s: TcpStream, reply: [u8; 1]) -> std::io::Result<()> {
    // A client that never sends must not hold a thread for long.
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 16];
    // The request is consumed before the close, so the close is a FIN and not a RST.
    let _ = s.read(&mut buf)?;
    s.write_all(&reply)
}

fn udp_loop(s: &UdpSocket, reply: [u8; 1]) {
    let mut buf = [0u8; 512];
    loop {
        if let Ok((_, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&reply, from);
        }
    }
}

/// A running backend server, killed (by pid) on drop.
pub struct BenchServer {
    _child: procs::ChildGuard,
}

impl BenchServer {
    /// Starts `svclb-bench serve` in `netns` and waits until it has bound its sockets.
    pub fn start(bench_bin: &Path, netns: &str, id: char) -> Result<Self> {
        let mut cmd = Command::new(bench_bin);
        cmd.args(["serve", "--netns", netns, "--id", &id.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        procs::die_with_parent(&mut cmd, libc::SIGKILL);
        // Ctrl-C reaches only the bench, which then stops its children in order.
        cmd.process_group(0);
        let line = crate::cmd::describe(&cmd);
        let mut child = cmd.spawn().with_context(|| format!("start `{line}`"))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut guard = procs::ChildGuard::new(child, format!("bench server {id}"));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut first = String::new();
            let mut reader = BufReader::new(stdout);
            let _ = reader.read_line(&mut first);
            let _ = tx.send(first);
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(l) if l.trim() == "ready" => Ok(Self { _child: guard }),
            Ok(l) => {
                let status = guard.kill().ok();
                bail!("`{line}` did not start (said {l:?}, exit {status:?})")
            }
            Err(_) => bail!("`{line}` not ready after 10 s"),
        }
    }
}
