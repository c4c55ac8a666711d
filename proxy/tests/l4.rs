//! `l4-proxy` and the sidecars' part in chains, seen from outside: real processes, real TCP
//! and UDP services on loopback, the control side of a network in this process.

mod support;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use control::lookup::Limits;
use support::*;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream, UdpSocket},
};

const L4_PROXY: &str = env!("CARGO_BIN_EXE_l4-proxy");
const DEADLINE: Duration = Duration::from_secs(30);

/// A TCP service that writes every line it reads back with `prefix` in front, and counts the
/// bytes it read.
async fn tcp_prefixer(prefix: &'static str) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let read = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&read);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read);
                let mut line = String::new();
                while lines.read_line(&mut line).await.unwrap_or(0) > 0 {
                    counted.fetch_add(line.len() as u64, Ordering::Relaxed);
                    let out = format!("{prefix}{line}");
                    if write.write_all(out.as_bytes()).await.is_err() {
                        return;
                    }
                    line.clear();
                }
                // The client's end, passed on.
                let _ = write.shutdown().await;
            });
        }
    });
    (addr, read)
}

/// A UDP service that answers every datagram with `prefix` in front of it.
async fn udp_prefixer(prefix: &'static str) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buffer = vec![0; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buffer).await {
            let mut out = prefix.as_bytes().to_vec();
            out.extend_from_slice(&buffer[..n]);
            let _ = socket.send_to(&out, from).await;
        }
    });
    addr
}

/// A sidecar (`proxy` in service mode) of `service` at `addr`, spoken to as `protocol`.
async fn sidecar(network: &Network, service: &str, addr: SocketAddr, protocol: &str) -> Proxy {
    let upstream = addr.to_string();
    start_proxy(
        network,
        &[
            "--quic-addr",
            "127.0.0.1:0",
            "--protocol",
            protocol,
            "0",
            service,
            &upstream,
        ],
    )
    .await
}

/// An `l4-proxy` on the network; returns it and its control API's address.
async fn l4_proxy(network: &Network) -> (Process, String) {
    let (process, control, _) = l4_proxy_with_metrics(network).await;
    (process, control)
}

/// [`l4_proxy`], and the address of its /metrics.
async fn l4_proxy_with_metrics(network: &Network) -> (Process, String, String) {
    l4_proxy_with(network, &[]).await
}

/// [`l4_proxy_with_metrics`] with `extra` flags.
async fn l4_proxy_with(network: &Network, extra: &[&str]) -> (Process, String, String) {
    let boot = network.boot_arg();
    let mut flags = vec!["--udp-idle-timeout", "2s"];
    flags.extend_from_slice(extra);
    flags.push("0");
    let mut args = proxy_args(&boot, &flags);
    // The original's single-dash spelling.
    args[0] = "-bootstrap";
    let log = option_env!("MTC_TEST_LOG").unwrap_or("warn");
    let process = Process::spawn(L4_PROXY, &args, &[("RUST_LOG", log)]);
    let prefix = "l4 control API: http://";
    let line = process.line_containing(prefix, DEADLINE).await;
    let control = line[line.find(prefix).unwrap() + prefix.len()..].to_owned();
    let line = process.line_containing("metrics: http://", DEADLINE).await;
    let metrics = line["metrics: http://".len()..]
        .trim_end_matches("/metrics")
        .to_owned();
    (process, control, metrics)
}

/// Asks the control API for `spec`: its status and body.
async fn ask(control: &str, spec: &str) -> (u16, String) {
    http_get(control, spec)
        .await
        .expect("the control API answers")
}

async fn chain_addr(control: &str, spec: &str) -> SocketAddr {
    let (status, body) = ask(control, spec).await;
    assert_eq!(status, 200, "{spec}: {body}");
    body.trim().parse().expect("an address")
}

/// Writes `lines` on a new connection to `addr`, half-closes, and reads everything back.
async fn try_tcp_round(addr: SocketAddr, lines: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(lines.as_bytes()).await?;
    stream.shutdown().await?;
    let mut back = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut back))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    Ok(back)
}

/// [`try_tcp_round`], which must succeed.
async fn tcp_round(addr: SocketAddr, lines: &str) -> String {
    try_tcp_round(addr, lines)
        .await
        .expect("the tunnel carries the lines and ends cleanly")
}

/// Until a first connection through the chain at `addr` is carried whole: the hops' ingresses
/// find their next hop's instances on the overlay (with no allocator in these networks, a
/// set-up that comes before an instance is found is refused, not waited for).
async fn warm_up(addr: SocketAddr) {
    wait_until("a first connection through the chain", DEADLINE, || async {
        try_tcp_round(addr, "w\n").await.is_ok()
    })
    .await;
}

/// Sends `datagram` from `socket` to `addr` until an answer comes (UDP may drop the first
/// while the tunnel is set up); returns the answer.
async fn udp_round(socket: &UdpSocket, addr: SocketAddr, datagram: &[u8]) -> Vec<u8> {
    let mut buffer = vec![0; 65536];
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        socket.send_to(datagram, addr).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buffer)).await {
            Ok(Ok(n)) => return buffer[..n].to_vec(),
            _ => assert!(
                tokio::time::Instant::now() < deadline,
                "no answer through {addr}"
            ),
        }
    }
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_udp_services_are_reached_through_one_sidecar_each() {
    let network = Network::start().await;
    network.register("echo-tcp", Limits::default()).await;
    network.register("echo-udp", Limits::default()).await;
    let (tcp_addr, _) = tcp_prefixer("").await;
    let udp_addr = udp_prefixer("").await;
    let _tcp = sidecar(&network, "echo-tcp", tcp_addr, "tcp").await;
    let _udp = sidecar(&network, "echo-udp", udp_addr, "udp").await;
    let (_l4, control, metrics) = l4_proxy_with_metrics(&network).await;

    let tcp = chain_addr(&control, "/tcp/echo-tcp").await;
    warm_up(tcp).await;
    assert_eq!(
        chain_addr(&control, "/tcp/echo-tcp").await,
        tcp,
        "the same chain, the same listener"
    );
    assert_eq!(tcp_round(tcp, "hello\nworld\n").await, "hello\nworld\n");
    // Connections are tunnels of their own, several at once.
    let rounds = (0..8).map(|i| async move {
        let text = format!("connection {i}\n");
        assert_eq!(tcp_round(tcp, &text).await, text);
    });
    futures::future::join_all(rounds).await;

    let udp = chain_addr(&control, "/udp/echo-udp").await;
    let (a, b) = (
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    );
    assert_eq!(udp_round(&a, udp, b"from a").await, b"from a");
    assert_eq!(udp_round(&b, udp, b"from b").await, b"from b");
    // The largest datagram crosses whole (as a stream frame).
    let big = vec![7u8; 65507];
    let back = udp_round(&a, udp, &big).await;
    assert_eq!(back.len(), big.len());

    // Counted per chain: the ten TCP tunnels and their bytes each way.
    let text = http_get(&metrics, "/metrics").await.unwrap().1;
    let tcp = r#"chain="/tcp/echo-tcp",role="client""#;
    assert_eq!(
        metric(&text, &format!("l4_tunnels_total{{{tcp}}}")),
        Some(10.0),
        "{text}"
    );
    let sent = "w\n".len()
        + "hello\nworld\n".len()
        + (0..8)
            .map(|i| format!("connection {i}\n").len())
            .sum::<usize>();
    for direction in ["forward", "backward"] {
        assert_eq!(
            metric(
                &text,
                &format!(
                    r#"l4_bytes_total{{chain="/tcp/echo-tcp",direction="{direction}",role="client"}}"#
                )
            ),
            Some(sent as f64),
            "{direction}: {text}"
        );
    }
    // Datagrams that fit the path crossed as QUIC datagrams (the 65507-byte one could not).
    let udp = r#"chain="/udp/echo-udp",direction="forward",role="client""#;
    let quic = metric(&text, &format!("l4_quic_datagrams_total{{{udp}}}")).unwrap_or(0.0);
    assert!(quic >= 2.0, "{text}");
    // A UDP client quiet for the idle timeout (2 s here) is forgotten, its tunnel closed.
    wait_until(
        "the UDP tunnels closed after the idle timeout",
        DEADLINE,
        || async {
            let text = http_get(&metrics, "/metrics").await.unwrap().1;
            metric(
                &text,
                r#"l4_tunnels_open{chain="/udp/echo-udp",role="client"}"#,
            ) == Some(0.0)
        },
    )
    .await;
}

/// Issue 16: what one UDP source can make an l4-proxy hold or carry is bounded: a third source
/// past `--max-udp-clients 2` gets nothing through, and a source's datagrams past `--udp-rate`
/// (50 a second, bursts of 5) are dropped; both counted.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_sources_past_their_limits_are_dropped_and_counted() {
    let network = Network::start().await;
    network.register("echo-udp", Limits::default()).await;
    let _udp = sidecar(&network, "echo-udp", udp_prefixer("").await, "udp").await;
    let (_l4, control, metrics) =
        l4_proxy_with(&network, &["--max-udp-clients", "2", "--udp-rate", "50"]).await;
    let udp = chain_addr(&control, "/udp/echo-udp").await;
    let sockets = futures::future::join_all((0..3).map(|_| UdpSocket::bind("127.0.0.1:0"))).await;
    let [a, b, c] = <[_; 3]>::try_from(sockets).unwrap().map(Result::unwrap);
    assert_eq!(udp_round(&a, udp, b"a").await, b"a");
    assert_eq!(udp_round(&b, udp, b"b").await, b"b");
    let dropped = |reason: &'static str| {
        let metrics = metrics.clone();
        async move {
            let text = http_get(&metrics, "/metrics").await.unwrap().1;
            let series = format!(
                r#"l4_datagrams_dropped_total{{chain="/udp/echo-udp",reason="{reason}",role="client"}}"#
            );
            metric(&text, &series).unwrap_or(0.0) as usize
        }
    };

    for _ in 0..3 {
        c.send_to(b"c", udp).await.unwrap();
    }
    wait_until("the third source's datagrams dropped", DEADLINE, || async {
        dropped("too_many_clients").await == 3
    })
    .await;
    let mut buffer = [0; 64];
    assert!(c.try_recv(&mut buffer).is_err(), "nothing came back to c");

    // 40 at once from a: a burst passes, the rest is dropped; every one is accounted for.
    for i in 0..40u8 {
        a.send_to(&[i], udp).await.unwrap();
    }
    let mut answers = 0;
    wait_until("every datagram answered or dropped", DEADLINE, || {
        while a.try_recv(&mut buffer).is_ok() {
            answers += 1;
        }
        let answers = answers;
        let dropped = dropped("rate_limited");
        async move { answers + dropped.await == 40 }
    })
    .await;
    assert!((1..40).contains(&answers), "{answers} passed of 40");
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_passes_each_service_in_order_and_replies_skip_the_first() {
    let network = Network::start().await;
    for name in ["first", "second", "udp-first", "udp-second", "udp-last"] {
        network.register(name, Limits::default()).await;
    }
    let (first_addr, first_read) = tcp_prefixer("1:").await;
    let (second_addr, second_read) = tcp_prefixer("2:").await;
    let _first = sidecar(&network, "first", first_addr, "tcp").await;
    let _second = sidecar(&network, "second", second_addr, "tcp").await;
    let _u1 = sidecar(&network, "udp-first", udp_prefixer("u1:").await, "udp").await;
    let _u2 = sidecar(&network, "udp-second", udp_prefixer("u2:").await, "udp").await;
    let _u3 = sidecar(&network, "udp-last", udp_prefixer("u3:").await, "udp").await;
    let (_l4, control) = l4_proxy(&network).await;

    // TCP: the first service's output is the second's input; the second's output comes
    // back to the client without entering the first again.
    let tcp = chain_addr(&control, "/tcp/first/second").await;
    let sent = "abc\ndef\n";
    assert_eq!(tcp_round(tcp, sent).await, "2:1:abc\n2:1:def\n");
    assert_eq!(first_read.load(Ordering::Relaxed), sent.len() as u64);
    assert_eq!(
        second_read.load(Ordering::Relaxed),
        "1:abc\n1:def\n".len() as u64
    );

    // UDP all the way.
    let udp = chain_addr(&control, "/udp/udp-first/udp-second").await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(udp_round(&client, udp, b"x").await, b"u2:u1:x");

    // Mixed: a TCP client and service, then a UDP service.
    let mixed = chain_addr(&control, "/tcp/first/udp/udp-last").await;
    warm_up(mixed).await;
    let mut stream = TcpStream::connect(mixed).await.unwrap();
    stream.write_all(b"m\n").await.unwrap();
    let mut back = vec![0; 64];
    let n = tokio::time::timeout(DEADLINE, stream.read(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back[..n], b"u3:1:m\n");
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chains_are_refused_with_the_reason() {
    let network = Network::start().await;
    network.register("known", Limits::default()).await;
    let (_l4, control) = l4_proxy(&network).await;
    let cases = [
        ("/tcp/known?x=1", 400, "query string"),
        ("/tcp", 400, "at least two tokens"),
        ("/sctp/known", 400, "tcp or udp"),
        ("/tcp/known/udp", 400, "not followed by a service"),
        ("/tcp/known/known", 400, "may not loop"),
        ("/tcp/-bad", 400, "invalid service name"),
        ("/tcp/known/unknown", 404, "no service named 'unknown'"),
    ];
    for (spec, status, reason) in cases {
        let (got, body) = ask(&control, spec).await;
        assert_eq!(got, status, "{spec}: {body}");
        assert!(body.contains(reason), "{spec}: {body}");
    }
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_instance_of_a_hop_moves_new_connections_to_another() {
    let network = Network::start().await;
    network.register("front", Limits::default()).await;
    network.register("back", Limits::default()).await;
    let (front_addr, _) = tcp_prefixer("f:").await;
    let _front = sidecar(&network, "front", front_addr, "tcp").await;
    let mut backs = HashMap::new();
    for prefix in ["a:", "b:"] {
        let (addr, _) = tcp_prefixer(prefix).await;
        backs.insert(prefix, sidecar(&network, "back", addr, "tcp").await);
    }
    let (_l4, control) = l4_proxy(&network).await;
    let chain = chain_addr(&control, "/tcp/front/back").await;
    warm_up(chain).await;
    let answered = tcp_round(chain, "x\n").await;
    let (used, other) = if answered.starts_with("a:") {
        ("a:", "b:")
    } else {
        ("b:", "a:")
    };
    assert_eq!(answered, format!("{used}f:x\n"));
    // A tunnel through the front hop alone, on the same connection between the l4-proxy and
    // the front hop's sidecar, kept open across the kill (the original closed that
    // connection, and every tunnel on it, when a next hop failed).
    let alone = chain_addr(&control, "/tcp/front").await;
    let stream = TcpStream::connect(alone).await.unwrap();
    let mut kept = BufReader::new(stream);
    kept.get_mut().write_all(b"k\n").await.unwrap();
    let mut line = String::new();
    kept.read_line(&mut line).await.unwrap();
    assert_eq!(line, "f:k\n");
    // The instance the front hop uses is killed outright: no goodbye on its connections.
    let mut killed = backs.remove(used).unwrap();
    killed.process.child.kill().await.unwrap();
    for i in 0..20 {
        let text = format!("after {i}\n");
        assert_eq!(
            tcp_round(chain, &text).await,
            format!("{other}f:{text}"),
            "connection {i} after the kill"
        );
    }
    // Only the tunnels through the killed instance were affected.
    kept.get_mut().write_all(b"still\n").await.unwrap();
    line.clear();
    kept.read_line(&mut line).await.unwrap();
    assert_eq!(line, "f:still\n");
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_that_answers_its_next_hop_failed_is_not_asked_again() {
    // "back" is known to the lookup, but has no instance and no allocator could start one:
    // the front hop answers that the rest of the chain failed, after its own tries. The
    // l4-proxy ends the client's connection on that answer, rather than ask the same front
    // hop again and again until its retry budget is spent.
    let network = Network::start().await;
    network.register("front", Limits::default()).await;
    network.register("back", Limits::default()).await;
    let (front_addr, _) = tcp_prefixer("f:").await;
    let front = sidecar(&network, "front", front_addr, "tcp").await;
    let (_l4, control, metrics) = l4_proxy_with_metrics(&network).await;
    warm_up(chain_addr(&control, "/tcp/front").await).await;
    let chain = chain_addr(&control, "/tcp/front/back").await;
    let answer = try_tcp_round(chain, "x\n").await;
    assert!(
        answer.as_deref().is_ok_and(str::is_empty) || answer.is_err(),
        "{answer:?}"
    );
    let hop = http_get(&front.metrics, "/metrics").await.unwrap().1;
    let failed =
        r#"l4_tunnel_failures_total{chain="/tcp/front/back",reason="next_hop",role="hop"}"#;
    assert_eq!(metric(&hop, failed), Some(1.0), "{hop}");
    let ingress = http_get(&metrics, "/metrics").await.unwrap().1;
    let retried = r#"proxy_retries_total{outcome="taken",service="front"}"#;
    assert_eq!(metric(&ingress, retried), None, "{ingress}");
}

/// A TCP service that reads each connection to its end and reports how it ended, if
/// anything arrived on it (the sidecar's liveness checks connect and close).
async fn end_watcher() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<std::io::ErrorKind>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tell, ends) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tell = tell.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0; 4096];
                let mut got = false;
                loop {
                    match stream.read(&mut buffer).await {
                        Ok(0) => {
                            if got {
                                let _ = tell.send(std::io::ErrorKind::UnexpectedEof);
                            }
                            return;
                        }
                        // Said when something arrived, so the test knows the tunnel is up.
                        Ok(_) => {
                            got = true;
                            let _ = stream.write_all(b"got it\n").await;
                        }
                        Err(error) => {
                            let _ = tell.send(error.kind());
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, ends)
}

async fn end_of(
    ends: &mut tokio::sync::mpsc::UnboundedReceiver<std::io::ErrorKind>,
) -> std::io::ErrorKind {
    tokio::time::timeout(DEADLINE, ends.recv())
        .await
        .expect("the service hears how the client ended")
        .unwrap()
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_close_crosses_as_one_and_a_reset_as_a_reset() {
    let network = Network::start().await;
    network.register("watcher", Limits::default()).await;
    let (addr, mut ends) = end_watcher().await;
    let _side = sidecar(&network, "watcher", addr, "tcp").await;
    let (_l4, control) = l4_proxy(&network).await;
    let chain = chain_addr(&control, "/tcp/watcher").await;
    warm_up(chain).await;
    // The warm-up's own end.
    assert_eq!(end_of(&mut ends).await, std::io::ErrorKind::UnexpectedEof);

    // Half-close: the service reads to its end, and can still answer after it.
    let mut stream = TcpStream::connect(chain).await.unwrap();
    stream.write_all(b"one\n").await.unwrap();
    let mut got = [0; 7];
    stream.read_exact(&mut got).await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(end_of(&mut ends).await, std::io::ErrorKind::UnexpectedEof);

    // Reset: the client closes with a zero linger; the service's connection is reset, not
    // ended cleanly (it must not take a broken upload for a whole one).
    let stream = TcpStream::connect(chain).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    write.write_all(b"two\n").await.unwrap();
    read.read_exact(&mut got).await.unwrap();
    let stream = read.reunite(write).unwrap();
    #[allow(deprecated)]
    stream.set_linger(Some(Duration::ZERO)).unwrap();
    drop(stream);
    assert_eq!(end_of(&mut ends).await, std::io::ErrorKind::ConnectionReset);
}
