// The Node.js client (and HTTP backend) of tests/tests/runtimes.rs: the standard
// library's own sockets (net, http, dgram), as a Node application uses them, against
// svc-lb's socket programs. Run from the lab's client namespace and cgroup.
//
//   node client.js JOB...                     JOB = MODE,HOST,PORT,COUNT; one JSON line each
//   node client.js long-udp HOST PORT MS      one JSON line per reply or error, for MS ms
//   node client.js serve-http ID PORT ADDR... HTTP backend answering ID; prints `ready`
//
// MODE: tcp (net.connect), http (http.get, no keep-alive), udp-connected (dgram
// connect + send) and udp (dgram send to HOST). Every attempt uses a new socket, so
// every attempt is a new backend choice. HOST with a colon uses an AF_INET6 socket
// (dual-stack: `::ffff:a.b.c.d` reaches an IPv4 address), without one AF_INET.
'use strict';
const dgram = require('dgram');
const fs = require('fs');
const http = require('http');
const net = require('net');

const TIMEOUT_MS = 2000;

function fmt(addr, port) {
  return addr.includes(':') ? `[${addr}]:${port}` : `${addr}:${port}`;
}

function inc(map, key) {
  map[key] = (map[key] || 0) + 1;
}

// The family of this process's socket bound to local `port`, from the kernel's own
// tables (`/proc/self/net/{tcp,udp}{,6}` of this network namespace): what the runtime
// really opened, whatever address form it shows the application.
function family(proto, port) {
  const hex = ':' + port.toString(16).toUpperCase().padStart(4, '0');
  for (const [file, fam] of [[proto + '6', 'inet6'], [proto, 'inet']]) {
    const lines = fs.readFileSync('/proc/self/net/' + file, 'utf8').split('\n').slice(1);
    if (lines.some((l) => (l.trim().split(/\s+/)[1] || '').endsWith(hex))) {
      return fam;
    }
  }
  return 'none';
}

// Runs `start(resolve, reject)`, which returns its cleanup; fails with TIMEOUT after
// TIMEOUT_MS. The cleanup runs once, whatever ends the attempt.
function withTimeout(what, start) {
  return new Promise((resolve, reject) => {
    let done = false;
    let cleanup = () => {};
    let timer = null;
    const finish = (f) => (v) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      cleanup();
      f(v);
    };
    timer = setTimeout(() => {
      const e = new Error(`${what}: no answer in ${TIMEOUT_MS} ms`);
      e.code = 'TIMEOUT';
      finish(reject)(e);
    }, TIMEOUT_MS);
    cleanup = start(finish(resolve), finish(reject));
  });
}

function tcp(host, port) {
  return withTimeout('tcp', (resolve, reject) => {
    const s = net.connect({ host, port });
    let peer = null;
    let fam = null;
    const chunks = [];
    s.on('connect', () => {
      // getpeername(): the address the socket programs show the application.
      peer = fmt(s.remoteAddress, s.remotePort);
      fam = family('tcp', s.localPort);
      s.write('x');
    });
    s.on('data', (d) => chunks.push(d));
    s.on('end', () => resolve({ id: Buffer.concat(chunks).toString().trim(), peer, fam }));
    s.on('error', reject);
    return () => s.destroy();
  });
}

function httpGet(host, port) {
  return withTimeout('http', (resolve, reject) => {
    const req = http.get({ host, port, path: '/', agent: false }, (res) => {
      const peer = fmt(res.socket.remoteAddress, res.socket.remotePort);
      const chunks = [];
      res.on('data', (d) => chunks.push(d));
      res.on('end', () => {
        if (res.statusCode !== 200) {
          const e = new Error(`HTTP ${res.statusCode}`);
          e.code = `HTTP_${res.statusCode}`;
          reject(e);
        } else {
          resolve({ id: Buffer.concat(chunks).toString().trim(), peer });
        }
      });
    });
    req.on('error', reject);
    return () => req.destroy();
  });
}

function udp(host, port, connected) {
  const type = host.includes(':') ? 'udp6' : 'udp4';
  return withTimeout(type, (resolve, reject) => {
    const s = dgram.createSocket(type);
    let peer = null;
    s.on('message', (msg, rinfo) => {
      const fam = family('udp', s.address().port);
      resolve({ id: msg.toString().trim(), peer, fam, source: fmt(rinfo.address, rinfo.port) });
    });
    s.on('error', reject);
    if (connected) {
      s.connect(port, host, (err) => {
        if (err) {
          reject(err);
          return;
        }
        const r = s.remoteAddress();
        peer = fmt(r.address, r.port);
        s.send('x', (e) => e && reject(e));
      });
    } else {
      s.send('x', port, host, (e) => e && reject(e));
    }
    return () => {
      try {
        s.close();
      } catch (_) {
        // already closed
      }
    };
  });
}

async function job(spec) {
  const [mode, host, portS, countS] = spec.split(',');
  const port = Number(portS);
  const count = Number(countS);
  const out = { job: spec, ok: 0, failed: 0, backends: {}, peers: {}, sources: {}, families: {}, errors: {} };
  for (let i = 0; i < count; i++) {
    try {
      let r;
      if (mode === 'tcp') r = await tcp(host, port);
      else if (mode === 'http') r = await httpGet(host, port);
      else if (mode === 'udp-connected') r = await udp(host, port, true);
      else if (mode === 'udp') r = await udp(host, port, false);
      else throw new Error(`unknown mode ${mode}`);
      out.ok += 1;
      inc(out.backends, r.id);
      if (r.peer) inc(out.peers, r.peer);
      if (r.source) inc(out.sources, r.source);
      if (r.fam) inc(out.families, r.fam);
    } catch (e) {
      out.failed += 1;
      inc(out.errors, e.code || String(e));
    }
  }
  return out;
}

// A resolver-like client: one connected UDP socket that sends every 20 ms and waits
// for each reply; after an error it closes the socket and connects a new one.
async function longUdp(host, port, ms) {
  const type = host.includes(':') ? 'udp6' : 'udp4';
  const t0 = Date.now();
  const say = (o) => process.stdout.write(JSON.stringify({ t: Date.now() - t0, ...o }) + '\n');
  let sock = null;
  let waiter = null;
  const settle = (v) => {
    if (waiter) {
      const w = waiter;
      waiter = null;
      w(v);
    }
  };
  const open = () =>
    new Promise((resolve) => {
      const s = dgram.createSocket(type);
      // Events of a socket already given up must not answer for its successor.
      s.on('message', (msg, rinfo) => {
        if (s === sock) settle({ id: msg.toString().trim(), source: fmt(rinfo.address, rinfo.port) });
      });
      // A socket the agent destroyed: `recvmsg` fails (ECONNABORTED), Node emits it here.
      s.on('error', (e) => {
        if (s === sock) settle({ error: e.code || String(e), op: e.syscall || '?' });
      });
      s.connect(port, host, (err) => {
        if (err) {
          say({ event: 'error', error: err.code || String(err), op: 'connect' });
          s.close();
          resolve(null);
          return;
        }
        const r = s.remoteAddress();
        say({ event: 'connected', peer: fmt(r.address, r.port) });
        resolve(s);
      });
    });
  while (Date.now() - t0 < ms) {
    if (!sock) {
      sock = await open();
      if (!sock) {
        await new Promise((r) => setTimeout(r, 20));
        continue;
      }
    }
    const got = new Promise((resolve) => {
      waiter = resolve;
    });
    const timer = setTimeout(() => settle({ error: 'TIMEOUT', op: 'recv' }), 500);
    const cur = sock;
    cur.send('x', (e) => e && cur === sock && settle({ error: e.code || String(e), op: 'send' }));
    const r = await got;
    clearTimeout(timer);
    if (r.error) {
      say({ event: 'error', error: r.error, op: r.op });
      if (r.error !== 'TIMEOUT') {
        try {
          sock.close();
        } catch (_) {
          // already closed
        }
        sock = null;
      }
    } else {
      say({ event: 'reply', backend: r.id, source: r.source });
    }
    await new Promise((res) => setTimeout(res, 20));
  }
  if (sock) sock.close();
  say({ event: 'done' });
}

function serveHttp(id, port, addrs) {
  let pending = addrs.length;
  for (const host of addrs) {
    http
      .createServer((req, res) => {
        res.writeHead(200, { 'Content-Type': 'text/plain', Connection: 'close' });
        res.end(id);
      })
      .listen({ host, port }, () => {
        pending -= 1;
        if (pending === 0) process.stdout.write('ready\n');
      });
  }
}

async function main() {
  const args = process.argv.slice(2);
  if (args[0] === 'long-udp') {
    await longUdp(args[1], Number(args[2]), Number(args[3]));
  } else if (args[0] === 'serve-http') {
    serveHttp(args[1], Number(args[2]), args.slice(3));
  } else {
    for (const spec of args) {
      process.stdout.write(JSON.stringify(await job(spec)) + '\n');
    }
  }
}

main().catch((e) => {
  process.stderr.write(`client.js: ${e.stack || e}\n`);
  process.exit(1);
});
