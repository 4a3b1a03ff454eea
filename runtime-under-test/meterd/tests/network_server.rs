//! Network server with client runtimes: station counting across terminal servers, keepalive,
//! restart, malformed frames.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::SinkExt;
use meter_core::allocation::ProductKey;
use meter_core::reason::Reason;
use meter_core::station::{MachineRole, StationId};
use meterd::protocol::{Claim, FromServer, ToServer, WireSession};

fn server_with(
    vendor: &Vendor,
    products: &[&str],
    keepalive: &str,
) -> (Machine, Daemon, String, String) {
    server_with_options(vendor, products, keepalive, &[])
}

/// A server as [`server_with`] starts it, with more daemon options.
fn server_with_options(
    vendor: &Vendor,
    products: &[&str],
    keepalive: &str,
    options: &[&str],
) -> (Machine, Daemon, String, String) {
    let licence = vendor.issue("server", products);
    let server = Machine::new("srv", "workstation", "127.0.0.1");
    let mut args = vec![
        "--server",
        "--listen",
        "127.0.0.1:0",
        "--keepalive",
        keepalive,
    ];
    args.extend_from_slice(options);
    let daemon = server.start(&args);
    server.install(vendor, &licence);
    let (addr, pin) = server_endpoint(&server);
    (server, daemon, addr, pin)
}

fn client(name: &str, role: &str, address: &str, addr: &str, pin: &str) -> (Machine, Daemon) {
    let machine = Machine::new(name, role, address);
    let daemon = machine.start(&["--remote", addr, "--pin", pin]);
    wait_linked(&machine);
    (machine, daemon)
}

fn server_usage(server: &Machine, code: u64) -> (u64, u64) {
    let (_, status) = server.meter(&["status"]);
    for container in status["containers"].as_array().unwrap() {
        for product in container["products"].as_array().unwrap() {
            if product["code"] == code {
                return (
                    product["in_use"]["stations"].as_u64().unwrap(),
                    product["in_use"]["accesses"].as_u64().unwrap(),
                );
            }
        }
    }
    panic!("product {code} not on server: {status}");
}

#[test]
fn station_share_three_across_five_sessions_on_two_terminal_servers() {
    let vendor = Vendor::new();
    let (server, _sd, addr, pin) = server_with(
        &vendor,
        &["{ code: 1001, name: cad, quantity: 3, counting: station-share }"],
        "10",
    );
    let (ts1, _d1) = client("ts1", "terminal-server", "127.0.2.1", &addr, &pin);
    let (ts2, _d2) = client("ts2", "terminal-server", "127.0.2.2", &addr, &pin);

    // Session A is the test's own session: two apps in it are one station.
    let own = common::session_key(std::process::id());
    ts1.add_session(own, "rdp");
    let a1 = ts1.hold(1001, None);
    let a2 = ts1.hold(1001, None);
    assert!(a1.granted() && a2.granted(), "{} {}", a1.first, a2.first);
    assert_eq!(a1.first["station"], a2.first["station"]);
    assert_eq!(a1.first["station"], format!("ts1/s{own}"));
    let b = ts1.hold(1001, Some("rdp"));
    assert!(b.granted(), "{}", b.first);
    assert_ne!(a1.first["station"], b.first["station"]);
    let d = ts2.hold(1001, Some("rdp"));
    assert!(d.granted(), "{}", d.first);
    let e = ts2.hold(1001, Some("rdp"));
    assert_eq!(e.reason(), "quantity-exhausted", "{}", e.first);
    let c = ts1.hold(1001, Some("console"));
    assert_eq!(c.reason(), "quantity-exhausted", "{}", c.first);
    assert_eq!(server_usage(&server, 1001), (3, 4));
    // A station that leaves frees its place for another session.
    drop(b);
    wait_until(Duration::from_secs(5), || {
        server_usage(&server, 1001) == (2, 3)
    })
    .expect("b released");
    let e2 = ts2.hold(1001, Some("rdp"));
    assert!(e2.granted(), "{}", e2.first);
}

#[test]
fn repeated_accesses_in_one_station_count_once_over_the_network() {
    let vendor = Vendor::new();
    let (server, _sd, addr, pin) = server_with(
        &vendor,
        &["{ code: 1002, name: view, quantity: 1, counting: station-share }"],
        "10",
    );
    // A workstation is one station whatever its sessions.
    let (ws, _d) = client("ws9", "workstation", "127.0.2.9", &addr, &pin);
    let holders: Vec<Holder> = (0..4).map(|_| ws.hold(1002, None)).collect();
    assert!(holders.iter().all(Holder::granted));
    assert_eq!(server_usage(&server, 1002), (1, 4));
    let (other, _d2) = client("ws8", "workstation", "127.0.2.8", &addr, &pin);
    let denied = other.hold(1002, None);
    assert_eq!(denied.reason(), "quantity-exhausted");
}

#[test]
fn local_licence_is_refused_over_the_network() {
    let vendor = Vendor::new();
    let (_server, _sd, addr, pin) = server_with(
        &vendor,
        &["{ code: 9, name: single, quantity: 0, counting: user-limit }"],
        "10",
    );
    let (ws, _d) = client("ws1", "workstation", "127.0.2.3", &addr, &pin);
    let denied = ws.hold(9, None);
    assert_eq!(denied.reason(), "local-licence-remote", "{}", denied.first);
}

#[test]
fn a_silent_remote_station_is_released_after_its_keepalive_window() {
    let vendor = Vendor::new();
    let (server, _sd, addr, pin) = server_with(
        &vendor,
        &["{ code: 4, name: four, quantity: 1, counting: station-share }"],
        "1",
    );
    let (ws, client_daemon) = client("ws1", "workstation", "127.0.2.4", &addr, &pin);
    let holder = ws.hold(4, None);
    assert!(holder.granted(), "{}", holder.first);
    assert_eq!(allocations(&server).len(), 1);
    // Freeze the client runtime: its TCP connection stays open but keepalives stop.
    client_daemon.signal(nix::sys::signal::Signal::SIGSTOP);
    let stopped = Instant::now();
    let released = wait_until(Duration::from_secs(5), || allocations(&server).is_empty())
        .expect("server released the silent station");
    println!(
        "silent station released {:?} after SIGSTOP (window 1 s)",
        stopped.elapsed()
    );
    assert!(
        released >= Duration::from_millis(700),
        "released too early: {released:?}"
    );
    let (other, _d2) = client("ws2", "workstation", "127.0.2.5", &addr, &pin);
    assert!(other.hold(4, None).granted());
    client_daemon.signal(nix::sys::signal::Signal::SIGCONT);
}

#[test]
fn killed_remote_holder_is_released_on_the_server() {
    let vendor = Vendor::new();
    let (server, _sd, addr, pin) = server_with(
        &vendor,
        &["{ code: 6, name: six, quantity: 1, counting: user-limit }"],
        "10",
    );
    let (ws, _d) = client("ws1", "workstation", "127.0.2.6", &addr, &pin);
    let mut holder = ws.hold(6, None);
    assert!(holder.granted());
    let killed = Instant::now();
    holder.kill9();
    wait_until(Duration::from_secs(5), || allocations(&server).is_empty()).expect("released");
    println!("remote release after kill -9: {:?}", killed.elapsed());
}

#[test]
fn server_restart_loses_no_grant_and_double_grants_none() {
    let vendor = Vendor::new();
    let (server, mut server_daemon, addr, pin) = server_with(
        &vendor,
        &["{ code: 8, name: eight, quantity: 1, counting: user-limit }"],
        "3",
    );
    let (ws1, _d1) = client("ws1", "workstation", "127.0.2.11", &addr, &pin);
    let (ws2, _d2) = client("ws2", "workstation", "127.0.2.12", &addr, &pin);
    let holder = ws1.hold(8, None);
    assert!(holder.granted());
    server_daemon.kill9();
    let _restarted = server.start(&["--server", "--listen", &addr, "--keepalive", "3"]);
    // The other client may not take the licence: it is still held.
    let denied = ws2.hold(8, None);
    assert!(
        !denied.granted(),
        "double grant after restart: {}",
        denied.first
    );
    // ws1 reconnects and keeps its grant; after the window it is still held.
    wait_until(Duration::from_secs(10), || {
        let (_, status) = server.meter(&["status"]);
        status["server"]["stations"]
            .as_array()
            .is_some_and(|s| s.len() == 2)
    })
    .expect("clients reconnected");
    std::thread::sleep(Duration::from_millis(3500));
    let held = allocations(&server);
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(allocations(&ws1).len(), 1);
    assert!(!ws2.hold(8, None).granted());
}

/// Without the usage log the seat is in memory only; with it, it is written with its record.
#[rstest::rstest]
#[case::seats_in_memory(&["--no-usage-log"])]
#[case::seats_written_with_the_usage_log(&[])]
fn a_seat_answered_before_a_crash_waits_for_its_holder_after_the_restart(#[case] options: &[&str]) {
    let vendor = Vendor::new();
    let (server, mut server_daemon, addr, pin) = server_with_options(
        &vendor,
        &["{ code: 15, name: fifteen, quantity: 1, counting: station-share }"],
        "10",
        options,
    );
    let rt = runtime_for_raw_stations();
    let keeper = meterd::tls::Identity::generate().unwrap();
    rt.block_on(async {
        let (mut link, _welcome) = raw_hello(&addr, &pin, "keeper", &keeper, false, vec![]).await;
        meterd::frame::send(&mut link, &access("keeper", 1, 15))
            .await
            .unwrap();
        let granted: FromServer = meterd::frame::recv(&mut link).await.unwrap();
        assert!(matches!(granted, FromServer::Granted { .. }), "{granted:?}");
        // Killed the moment the answer arrives: the seat was in memory only.
        server_daemon.kill9();
    });
    let mut args = vec!["--server", "--listen", &addr, "--keepalive", "10"];
    args.extend_from_slice(options);
    let _restarted = server.start(&args);
    rt.block_on(async {
        // Another station asks first; its answer waits for the keeper, known from before.
        let mut other = raw_station(&addr, &pin, "other", false).await;
        meterd::frame::send(&mut other, &access("other", 1, 15))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ToServer::Access { claim, .. } = access("keeper", 1, 15) else {
            unreachable!()
        };
        let (_link, welcome) = raw_hello(&addr, &pin, "keeper", &keeper, false, vec![claim]).await;
        match welcome {
            FromServer::Welcome { restored, lost, .. } => {
                assert_eq!(
                    restored.len(),
                    1,
                    "re-claimed: {restored:?}, lost: {lost:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        let answer: FromServer = meterd::frame::recv(&mut other).await.unwrap();
        assert!(
            matches!(
                answer,
                FromServer::Denied {
                    reason: Reason::QuantityExhausted,
                    ..
                }
            ),
            "the seat went to another station before its holder re-claimed it: {answer:?}"
        );
    });
    assert_eq!(allocations(&server).len(), 1);
}

#[test]
fn a_malformed_frame_closes_only_its_connection() {
    let vendor = Vendor::new();
    let (server, _sd, addr, pin) = server_with(
        &vendor,
        &["{ code: 11, name: eleven, quantity: 5, counting: user-limit }"],
        "10",
    );
    let (ws, _d) = client("ws1", "workstation", "127.0.2.13", &addr, &pin);
    let holder = ws.hold(11, None);
    assert!(holder.granted());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pin = meterd::tls::parse_pin(&pin).unwrap();
        // Garbage instead of a hello.
        let identity = meterd::tls::Identity::generate().unwrap();
        let stream = meterd::remote::connect(&addr, pin, &identity, None)
            .await
            .unwrap();
        let mut framed = meterd::frame::framed(stream);
        framed
            .send(bytes::Bytes::from_static(&[0xff, 0xfe, 0xfd, 0x00]))
            .await
            .unwrap();
        let next = futures::StreamExt::next(&mut framed).await;
        assert!(
            next.is_none() || next.unwrap().is_err(),
            "connection should be closed"
        );
        // An oversized frame: announce 16 MiB.
        let stream = meterd::remote::connect(&addr, pin, &identity, None)
            .await
            .unwrap();
        let mut raw = stream;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        raw.write_all(&(16u32 << 20).to_be_bytes()).await.unwrap();
        raw.write_all(&[0u8; 1024]).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "oversized frame should close: {read:?}"
        );
    });

    // The real client is undisturbed: its grant stands and it can take more.
    assert_eq!(allocations(&server).len(), 1);
    let (code, out) = ws.meter(&["access", "--product", "11"]);
    assert_eq!(code, 0, "{out}");
}

/// A station speaking the server protocol itself, welcomed as `machine`; with `small_buffers`
/// it takes small segments into a small receive buffer, so unread answers fill the path quickly.
async fn raw_station(addr: &str, pin: &str, machine: &str, small_buffers: bool) -> RawLink {
    let identity = meterd::tls::Identity::generate().unwrap();
    let (link, welcome) = raw_hello(addr, pin, machine, &identity, small_buffers, vec![]).await;
    assert!(matches!(welcome, FromServer::Welcome { .. }), "{welcome:?}");
    link
}

/// A raw station's hello as runtime `<machine>-runtime`, authenticated as `identity`, claiming
/// `claims`: the link and the server's answer.
async fn raw_hello(
    addr: &str,
    pin: &str,
    machine: &str,
    identity: &meterd::tls::Identity,
    small_buffers: bool,
    claims: Vec<Claim>,
) -> (RawLink, FromServer) {
    use std::os::fd::AsFd;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if small_buffers {
        socket.set_recv_buffer_size(4096).unwrap();
        nix::sys::socket::setsockopt(&socket.as_fd(), nix::sys::socket::sockopt::TcpMaxSeg, &536)
            .unwrap();
    }
    let tcp = socket.connect(addr.parse().unwrap()).await.unwrap();
    let pin = meterd::tls::parse_pin(pin).unwrap();
    let tls = meterd::remote::secure(tcp, pin, identity).await.unwrap();
    let mut link = meterd::frame::framed(tls);
    let hello = ToServer::Hello {
        runtime: format!("{machine}-runtime"),
        machine: machine.into(),
        claims,
    };
    meterd::frame::send(&mut link, &hello).await.unwrap();
    let answer: FromServer = meterd::frame::recv(&mut link).await.unwrap();
    (link, answer)
}

type RawLink = tokio_util::codec::Framed<
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    tokio_util::codec::LengthDelimitedCodec,
>;

/// Access request `request` of the console of `machine` for product `code` of firm 10.
fn access(machine: &str, request: u64, code: u32) -> ToServer {
    ToServer::Access {
        request,
        claim: Claim {
            client_handle: request,
            product: ProductKey { firm: 10, code },
            station: StationId::machine(machine),
            session: WireSession::Console,
            role: MachineRole::Workstation,
            guest: false,
            user: None,
        },
    }
}

fn runtime_for_raw_stations() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_station_that_stops_reading_its_answers_is_released_after_its_keepalive_window() {
    let vendor = Vendor::new();
    let (server, _sd, addr, pin) = server_with(
        &vendor,
        &["{ code: 12, name: twelve, quantity: 1, counting: station-share }"],
        "1",
    );
    let rt = runtime_for_raw_stations();
    let link = rt.block_on(async {
        let mut link = raw_station(&addr, &pin, "reader", true).await;
        meterd::frame::send(&mut link, &access("reader", 1, 12))
            .await
            .unwrap();
        let granted: FromServer = meterd::frame::recv(&mut link).await.unwrap();
        assert!(matches!(granted, FromServer::Granted { .. }), "{granted:?}");
        link
    });
    let (mut requests, mut answers) = futures::StreamExt::split(link);
    // From now on the station keeps asking but reads nothing; the product it asks for does not
    // exist, so every answer is a denial.
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flooder = rt.spawn({
        let sent = std::sync::Arc::clone(&sent);
        async move {
            for request in 2u64.. {
                if meterd::frame::send(&mut requests, &access("reader", request, 99))
                    .await
                    .is_err()
                {
                    return;
                }
                sent.store(request - 1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let released = wait_until(Duration::from_secs(20), || allocations(&server).is_empty())
        .expect("the server released the station that stopped reading");
    println!("station that stopped reading released {released:?} after it stopped (window 1 s)");
    assert!(
        released >= Duration::from_millis(700),
        "released too early: {released:?}"
    );
    // The server closed the connection: what it had sent ends in its close. The station reads
    // to see it, because with both receive windows shut the kernel may stall the station's
    // writes past any deadline (3 of 27 loaded runs here: sends still pending 10 s on).
    let read = rt
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(10), async {
                let mut read = 0u64;
                while let Some(Ok(_)) = futures::StreamExt::next(&mut answers).await {
                    read += 1;
                }
                read
            })
            .await
        })
        .expect("the server closed the connection");
    flooder.abort();
    println!(
        "{} requests sent, {read} answers read before the server's close",
        sent.load(std::sync::atomic::Ordering::Relaxed)
    );
    let (ws, _d) = client("ws1", "workstation", "127.0.2.14", &addr, &pin);
    assert!(ws.hold(12, None).granted());
}

#[test]
fn thousands_of_network_grants_are_listed_and_counted_once_per_station() {
    const STATIONS: u64 = 12;
    const PER_STATION: u64 = 250;
    let vendor = Vendor::new();
    let (server, _sd, addr, pin) = server_with(
        &vendor,
        &["{ code: 13, name: thirteen, quantity: 12, counting: station-share }"],
        "10",
    );
    let rt = runtime_for_raw_stations();
    let _links = rt.block_on(async {
        let mut links = Vec::new();
        for station in 0..STATIONS {
            let name = format!("busy{station}");
            let mut link = raw_station(&addr, &pin, &name, false).await;
            for request in 1..=PER_STATION {
                meterd::frame::send(&mut link, &access(&name, request, 13))
                    .await
                    .unwrap();
                let answer: FromServer = meterd::frame::recv(&mut link).await.unwrap();
                assert!(matches!(answer, FromServer::Granted { .. }), "{answer:?}");
            }
            links.push(link);
        }
        links
    });
    assert_eq!(allocations(&server).len() as u64, STATIONS * PER_STATION);
    assert_eq!(
        server_usage(&server, 13),
        (STATIONS, STATIONS * PER_STATION)
    );
}

#[test]
fn twenty_thousand_pipelined_accesses_are_capped_per_station_and_others_are_served() {
    const SENT: u64 = 20_000;
    let vendor = Vendor::new();
    let (server, _sd, addr, pin) = server_with(
        &vendor,
        &["{ code: 14, name: fourteen, quantity: 2, counting: station-share }"],
        "10",
    );
    let rt = runtime_for_raw_stations();
    let (granted, capped, _link) = rt.block_on(async {
        let link = raw_station(&addr, &pin, "greedy", false).await;
        let (mut sink, mut stream) = futures::StreamExt::split(link);
        let sender = tokio::spawn(async move {
            for request in 1..=SENT {
                sink.feed(meterd::frame::encode(&access("greedy", request, 14)).unwrap())
                    .await
                    .unwrap();
            }
            sink.flush().await.unwrap();
            sink
        });
        let (mut granted, mut capped) = (0u64, 0u64);
        for _ in 0..SENT {
            let bytes = futures::StreamExt::next(&mut stream)
                .await
                .unwrap()
                .unwrap();
            match meterd::frame::decode::<FromServer>(&bytes).unwrap() {
                FromServer::Granted { .. } => granted += 1,
                FromServer::Denied { reason, .. } => {
                    assert_eq!(reason, meter_core::reason::Reason::GrantLimitReached);
                    capped += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let sink = sender.await.unwrap();
        (granted, capped, sink.reunite(stream).unwrap())
    });
    println!("{granted} granted, {capped} refused as grant-limit-reached");
    assert_eq!(
        granted,
        u64::from(meterd::remote_stations::MAX_GRANTS_PER_STATION)
    );
    assert_eq!(capped, SENT - granted);
    assert_eq!(server_usage(&server, 14), (1, granted));
    // Another station is unaffected.
    let (ws, _d) = client("ws1", "workstation", "127.0.2.15", &addr, &pin);
    assert!(ws.hold(14, None).granted());
}

#[test]
fn a_peer_without_a_client_certificate_is_refused() {
    let vendor = Vendor::new();
    let (_server, _sd, addr, pin) = server_with(
        &vendor,
        &["{ code: 15, name: fifteen, quantity: 1, counting: user-limit }"],
        "10",
    );
    let rt = runtime_for_raw_stations();
    rt.block_on(async {
        let pin = meterd::tls::parse_pin(&pin).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer(pin)))
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        // TLS 1.3 reports a refused client only at the first read after the handshake.
        let outcome = async {
            let tls = connector
                .connect(meterd::tls::server_name(), tcp)
                .await
                .map_err(|e| e.to_string())?;
            let mut link = meterd::frame::framed(tls);
            let hello = ToServer::Hello {
                runtime: "anonymous".into(),
                machine: "anonymous".into(),
                claims: Vec::new(),
            };
            meterd::frame::send(&mut link, &hello)
                .await
                .map_err(|e| e.to_string())?;
            meterd::frame::recv::<FromServer, _>(&mut link)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        assert!(
            outcome.is_err(),
            "welcomed without a certificate: {outcome:?}"
        );
    });
}

#[test]
fn a_hello_for_another_runtimes_id_from_another_key_is_refused_and_its_grants_stay() {
    let vendor = Vendor::new();
    let (server, _sd, addr, pin) = server_with(
        &vendor,
        &["{ code: 16, name: sixteen, quantity: 1, counting: station-share }"],
        "10",
    );
    let (victim, _d) = client("vm1", "workstation", "127.0.2.16", &addr, &pin);
    let holder = victim.hold(16, None);
    assert!(holder.granted(), "{}", holder.first);
    let (_, status) = victim.meter(&["status"]);
    let victim_id = status["machine"]["runtime_id"].as_str().unwrap().to_owned();
    let rt = runtime_for_raw_stations();
    let answer = rt.block_on(async {
        let identity = meterd::tls::Identity::generate().unwrap();
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let pin = meterd::tls::parse_pin(&pin).unwrap();
        let tls = meterd::remote::secure(tcp, pin, &identity).await.unwrap();
        let mut link = meterd::frame::framed(tls);
        let hello = ToServer::Hello {
            runtime: victim_id.clone(),
            machine: "vm1".into(),
            claims: Vec::new(),
        };
        meterd::frame::send(&mut link, &hello).await.unwrap();
        meterd::frame::recv::<FromServer, _>(&mut link)
            .await
            .unwrap()
    });
    assert_eq!(
        answer,
        FromServer::Refused {
            reason: meter_core::reason::Reason::StationRefused
        }
    );
    // The victim's grant is still counted, and another machine cannot take the seat.
    assert_eq!(allocations(&server).len(), 1);
    assert_eq!(server_usage(&server, 16), (1, 1));
    let (other, _d2) = client("vm2", "workstation", "127.0.2.17", &addr, &pin);
    assert_eq!(other.hold(16, None).reason(), "quantity-exhausted");
}

#[test]
fn two_runtimes_naming_one_machine_are_two_stations() {
    let vendor = Vendor::new();
    let (server, _sd, addr, pin) = server_with(
        &vendor,
        &["{ code: 17, name: seventeen, quantity: 1, counting: station-share }"],
        "10",
    );
    let (first, _d1) = client("vm1", "workstation", "127.0.2.18", &addr, &pin);
    let held = first.hold(17, None);
    assert!(held.granted(), "{}", held.first);
    let (impostor, _d2) = client("vm1", "workstation", "127.0.2.19", &addr, &pin);
    let denied = impostor.hold(17, None);
    assert_eq!(denied.reason(), "quantity-exhausted", "{}", denied.first);
    assert_eq!(server_usage(&server, 17), (1, 1));
}

#[test]
fn two_thousand_idle_connections_leave_the_local_socket_answering() {
    let vendor = Vendor::new();
    let (server, _sd, addr, _pin) = server_with(
        &vendor,
        &["{ code: 18, name: eighteen, quantity: 1, counting: user-limit }"],
        "10",
    );
    let target: std::net::SocketAddr = addr.parse().unwrap();
    let mut idle = Vec::new();
    for i in 0..2000u32 {
        // From 40 loopback addresses, 50 each.
        let source = std::net::Ipv4Addr::new(127, 0, 4, (i % 40 + 1) as u8);
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&std::net::SocketAddr::from((source, 0)).into())
            .unwrap();
        if socket.connect(&target.into()).is_ok() {
            idle.push(socket);
        }
    }
    assert_eq!(idle.len(), 2000);
    let mut timings = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let (code, status) = server.meter(&["status"]);
        timings.push(started.elapsed());
        assert_eq!(code, 0, "{status}");
    }
    timings.sort();
    println!(
        "meter status with 2000 idle TCP connections: median {:?}",
        timings[2]
    );
    let holder = server.hold(18, None);
    assert!(holder.granted(), "{}", holder.first);
}

/// Accepts the server certificate with this SHA-256, as a client without its own key would.
#[derive(Debug)]
struct AnyServer([u8; 32]);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if meterd::tls::fingerprint(end_entity) == hex::encode(self.0) {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not the pinned server".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
