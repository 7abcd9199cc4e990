// The Java client of tests/tests/runtimes.rs: the JDK's own sockets (java.net.Socket,
// HttpURLConnection, DatagramChannel, DatagramSocket), as a Java application uses them,
// against svc-lb's socket programs. Run with the single-file source launcher
// (`java Client.java ...`, no javac step) from the lab's client namespace and cgroup.
//
//   java Client.java JOB...                  JOB = MODE,HOST,PORT,COUNT; one JSON line each
//   java Client.java long-udp HOST PORT MS   one JSON line per reply or error, for MS ms
//
// MODE: tcp (Socket), http (HttpURLConnection, no keep-alive), udp-channel (connected
// DatagramChannel), udp-socket (DatagramSocket.connect) and udp (unconnected
// DatagramSocket). Every attempt uses a new socket, so every attempt is a new backend
// choice. Unless -Djava.net.preferIPv4Stack=true, the JDK opens AF_INET6 sockets for
// IPv4 destinations too and dials them as `::ffff:a.b.c.d`.
import java.io.IOException;
import java.io.InputStream;
import java.net.DatagramPacket;
import java.net.DatagramSocket;
import java.net.HttpURLConnection;
import java.net.Inet6Address;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.net.SocketAddress;
import java.net.SocketTimeoutException;
import java.net.URI;
import java.nio.ByteBuffer;
import java.nio.channels.DatagramChannel;
import java.nio.channels.SelectionKey;
import java.nio.channels.Selector;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

public class Client {
    static final int TIMEOUT_MS = 2000;

    public static void main(String[] args) throws Exception {
        // One connection per request: the test counts backend choices per connection.
        System.setProperty("http.keepAlive", "false");
        if (args.length == 4 && args[0].equals("long-udp")) {
            longUdp(args[1], Integer.parseInt(args[2]), Long.parseLong(args[3]));
            return;
        }
        for (String spec : args) {
            System.out.println(job(spec));
            System.out.flush();
        }
    }

    /** What one attempt saw. */
    record Seen(String id, String peer, String source, String family) {}

    static String job(String spec) {
        String[] f = spec.split(",");
        String mode = f[0];
        String host = f[1];
        int port = Integer.parseInt(f[2]);
        int count = Integer.parseInt(f[3]);
        InetSocketAddress target = new InetSocketAddress(host, port);
        long ok = 0;
        long failed = 0;
        Map<String, Long> backends = new TreeMap<>();
        Map<String, Long> peers = new TreeMap<>();
        Map<String, Long> sources = new TreeMap<>();
        Map<String, Long> families = new TreeMap<>();
        Map<String, Long> errors = new TreeMap<>();
        for (int i = 0; i < count; i++) {
            try {
                Seen s = switch (mode) {
                    case "tcp" -> tcp(target);
                    case "http" -> http(host, port);
                    case "udp-channel" -> udpChannel(target);
                    case "udp-socket" -> udpSocket(target, true);
                    case "udp" -> udpSocket(target, false);
                    default -> throw new IllegalArgumentException("unknown mode " + mode);
                };
                ok++;
                inc(backends, s.id);
                if (s.peer != null) inc(peers, s.peer);
                if (s.source != null) inc(sources, s.source);
                if (s.family != null) inc(families, s.family);
            } catch (IOException e) {
                failed++;
                inc(errors, errno(e));
            }
        }
        Map<String, Object> out = new TreeMap<>();
        out.put("job", spec);
        out.put("ok", ok);
        out.put("failed", failed);
        out.put("backends", backends);
        out.put("peers", peers);
        out.put("sources", sources);
        out.put("families", families);
        out.put("errors", errors);
        return json(out);
    }

    static Seen tcp(InetSocketAddress target) throws IOException {
        try (Socket s = new Socket()) {
            s.setSoTimeout(TIMEOUT_MS);
            s.connect(target, TIMEOUT_MS);
            String peer = fmt(s.getRemoteSocketAddress());
            String family = family("tcp", s.getLocalPort());
            s.getOutputStream().write('x');
            String id = new String(s.getInputStream().readAllBytes(), StandardCharsets.UTF_8).trim();
            return new Seen(id, peer, null, family);
        }
    }

    static Seen http(String host, int port) throws IOException {
        String h = host.contains(":") ? "[" + host + "]" : host;
        HttpURLConnection c =
                (HttpURLConnection) URI.create("http://" + h + ":" + port + "/").toURL().openConnection();
        c.setConnectTimeout(TIMEOUT_MS);
        c.setReadTimeout(TIMEOUT_MS);
        try {
            int code = c.getResponseCode();
            if (code != 200) {
                throw new IOException("HTTP_" + code);
            }
            try (InputStream in = c.getInputStream()) {
                return new Seen(new String(in.readAllBytes(), StandardCharsets.UTF_8).trim(), null, null, null);
            }
        } finally {
            c.disconnect();
        }
    }

    static Seen udpChannel(InetSocketAddress target) throws IOException {
        try (DatagramChannel ch = DatagramChannel.open();
                Selector sel = Selector.open()) {
            ch.connect(target);
            String peer = fmt(ch.getRemoteAddress());
            ch.write(ByteBuffer.wrap(new byte[] {'x'}));
            ch.configureBlocking(false);
            ch.register(sel, SelectionKey.OP_READ);
            ByteBuffer buf = ByteBuffer.allocate(256);
            SocketAddress from = null;
            long deadline = System.nanoTime() + TIMEOUT_MS * 1_000_000L;
            while (from == null) {
                long left = (deadline - System.nanoTime()) / 1_000_000L;
                if (left <= 0 || sel.select(left) == 0 && System.nanoTime() >= deadline) {
                    throw new SocketTimeoutException("no reply");
                }
                sel.selectedKeys().clear();
                from = ch.receive(buf);
            }
            buf.flip();
            String id = StandardCharsets.UTF_8.decode(buf).toString().trim();
            return new Seen(id, peer, fmt(from), family("udp", ((InetSocketAddress) ch.getLocalAddress()).getPort()));
        }
    }

    static Seen udpSocket(InetSocketAddress target, boolean connect) throws IOException {
        try (DatagramSocket s = new DatagramSocket()) {
            s.setSoTimeout(TIMEOUT_MS);
            String peer = null;
            DatagramPacket out;
            if (connect) {
                s.connect(target);
                peer = fmt(s.getRemoteSocketAddress());
                out = new DatagramPacket(new byte[] {'x'}, 1);
            } else {
                out = new DatagramPacket(new byte[] {'x'}, 1, target);
            }
            s.send(out);
            DatagramPacket in = new DatagramPacket(new byte[256], 256);
            s.receive(in);
            String id = new String(in.getData(), 0, in.getLength(), StandardCharsets.UTF_8).trim();
            return new Seen(id, peer, fmt(in.getSocketAddress()), family("udp", s.getLocalPort()));
        }
    }

    /**
     * A resolver-like client: one connected DatagramSocket that sends every 20 ms and
     * waits for each reply; after an error it closes the socket and connects a new one.
     */
    static void longUdp(String host, int port, long ms) throws IOException, InterruptedException {
        InetSocketAddress target = new InetSocketAddress(host, port);
        long t0 = System.nanoTime();
        DatagramSocket s = null;
        byte[] buf = new byte[256];
        while (elapsed(t0) < ms) {
            if (s == null) {
                s = new DatagramSocket();
                s.setSoTimeout(500);
                s.connect(target);
                say(t0, Map.of("event", "connected", "peer", fmt(s.getRemoteSocketAddress())));
            }
            String op = "send";
            try {
                s.send(new DatagramPacket(new byte[] {'x'}, 1));
                op = "recv";
                DatagramPacket in = new DatagramPacket(buf, buf.length);
                s.receive(in);
                String id = new String(in.getData(), 0, in.getLength(), StandardCharsets.UTF_8).trim();
                say(t0, Map.of("event", "reply", "backend", id, "source", fmt(in.getSocketAddress())));
            } catch (SocketTimeoutException e) {
                say(t0, Map.of("event", "error", "error", "TIMEOUT", "op", op));
            } catch (IOException e) {
                say(t0, Map.of("event", "error", "error", errno(e), "op", op));
                s.close();
                s = null;
            }
            Thread.sleep(20);
        }
        if (s != null) s.close();
        say(t0, Map.of("event", "done"));
    }

    static long elapsed(long t0) {
        return (System.nanoTime() - t0) / 1_000_000L;
    }

    static void say(long t0, Map<String, Object> fields) {
        Map<String, Object> m = new TreeMap<>(fields);
        m.put("t", elapsed(t0));
        System.out.println(json(m));
        System.out.flush();
    }

    /** The errno behind a JDK exception: the JDK reports strerror() text only. */
    static String errno(IOException e) {
        if (e instanceof SocketTimeoutException) return "TIMEOUT";
        String m = String.valueOf(e.getMessage());
        for (String[] p : List.of(
                new String[] {"Software caused connection abort", "ECONNABORTED"},
                new String[] {"Destination address required", "EDESTADDRREQ"},
                new String[] {"Connection refused", "ECONNREFUSED"},
                new String[] {"Network is unreachable", "ENETUNREACH"},
                new String[] {"Operation not permitted", "EPERM"})) {
            if (m.contains(p[0])) return p[1];
        }
        return e.getClass().getSimpleName() + ": " + m;
    }

    /** `a.b.c.d:port` or `[v6]:port`, as the JDK hands the address to the application. */
    static String fmt(SocketAddress a) {
        if (!(a instanceof InetSocketAddress isa)) return String.valueOf(a);
        InetAddress ip = isa.getAddress();
        String h = ip.getHostAddress();
        return (ip instanceof Inet6Address ? "[" + h + "]" : h) + ":" + isa.getPort();
    }

    /**
     * The family of this process's socket bound to local `port`, from the kernel's own
     * tables (`/proc/self/net/{tcp,udp}{,6}` of this network namespace): what the JDK
     * really opened, whatever address form it shows the application.
     */
    static String family(String proto, int port) throws IOException {
        String hex = String.format(":%04X", port);
        for (String[] f : List.of(new String[] {proto + "6", "inet6"}, new String[] {proto, "inet"})) {
            for (String line : Files.readAllLines(Path.of("/proc/self/net/" + f[0]))) {
                String[] cols = line.trim().split("\\s+");
                if (cols.length > 1 && cols[1].endsWith(hex)) return f[1];
            }
        }
        return "none";
    }

    static void inc(Map<String, Long> m, String k) {
        m.merge(k, 1L, Long::sum);
    }

    static String json(Object o) {
        if (o instanceof Map<?, ?> m) {
            StringBuilder b = new StringBuilder("{");
            for (Map.Entry<?, ?> e : m.entrySet()) {
                if (b.length() > 1) b.append(',');
                b.append(json(String.valueOf(e.getKey()))).append(':').append(json(e.getValue()));
            }
            return b.append('}').toString();
        }
        if (o instanceof Number) return o.toString();
        StringBuilder b = new StringBuilder("\"");
        for (char c : String.valueOf(o).toCharArray()) {
            if (c == '"' || c == '\\') b.append('\\').append(c);
            else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
            else b.append(c);
        }
        return b.append('"').toString();
    }
}
