//! Network server with client runtimes: station counting across terminal servers, keepalive,
//! restart, malformed frames.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::SinkExt;
use meter_core::allocation::ProductKey;
use meter_core::station::{MachineRole, StationId};
use meterd::protocol::{Claim, FromServer, ToServer, WireSession};

fn server_with(
    vendor: &Vendor,
    products: &[&str],
    keepalive: &str,
) -> (Machine, Daemon, String, String) {
    let licence = vendor.issue("server", products);
    let server = Machine::new("srv", "workstation", "127.0.0.1");
    let daemon = server.start(&[
        "--server",
        "--listen",
        "127.0.0.1:0",
        "--keepalive",
        keepalive,
    ]);
    server.install(vendor, &licence);
    let (addr, pin) = server_endpoint(&server);
    (server, daemon, addr, pin)
}

fn client(name: &str, role: &str, address: &str, addr: &str, pin: &str) -> (Machine, Daemon) {
    let machine = Machine::new(name, role, address);
    let daemon = machine.start(&["--remote", addr, "--pin", pin]);
    // Wait for the link to come up.
    wait_until(Duration::from_secs(10), || {
        let (_, status) = machine.meter(&["status"]);
        status["containers"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["kind"] == "remote" && c["state"] == "valid")
        })
    })
    .expect("client linked to server");
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
    let own = nix::unistd::getsid(None).unwrap().as_raw() as u32;
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
        let stream = meterd::remote::connect(&addr, pin, None).await.unwrap();
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
        let stream = meterd::remote::connect(&addr, pin, None).await.unwrap();
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
    use std::os::fd::AsFd;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if small_buffers {
        socket.set_recv_buffer_size(4096).unwrap();
        nix::sys::socket::setsockopt(&socket.as_fd(), nix::sys::socket::sockopt::TcpMaxSeg, &536)
            .unwrap();
    }
    let tcp = socket.connect(addr.parse().unwrap()).await.unwrap();
    let pin = meterd::tls::parse_pin(pin).unwrap();
    let tls = meterd::remote::secure(tcp, pin).await.unwrap();
    let mut link = meterd::frame::framed(tls);
    let hello = ToServer::Hello {
        runtime: format!("{machine}-runtime"),
        machine: machine.into(),
        claims: Vec::new(),
    };
    meterd::frame::send(&mut link, &hello).await.unwrap();
    let welcome: FromServer = meterd::frame::recv(&mut link).await.unwrap();
    assert!(matches!(welcome, FromServer::Welcome { .. }), "{welcome:?}");
    link
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
    let mut link = rt.block_on(async {
        let mut link = raw_station(&addr, &pin, "reader", true).await;
        meterd::frame::send(&mut link, &access("reader", 1, 12))
            .await
            .unwrap();
        let granted: FromServer = meterd::frame::recv(&mut link).await.unwrap();
        assert!(matches!(granted, FromServer::Granted { .. }), "{granted:?}");
        link
    });
    // From now on the station keeps asking (so it is never silent) but reads nothing; the
    // product it asks for does not exist, so every answer is a denial.
    let flooder = rt.spawn(async move {
        for request in 2u64.. {
            if meterd::frame::send(&mut link, &access("reader", request, 99))
                .await
                .is_err()
            {
                return request;
            }
        }
        unreachable!()
    });
    let released = wait_until(Duration::from_secs(20), || allocations(&server).is_empty())
        .expect("the server released the station that stopped reading");
    println!("station that stopped reading released {released:?} after it stopped (window 1 s)");
    assert!(
        released >= Duration::from_millis(700),
        "released too early: {released:?}"
    );
    // The server closed the connection, so the flooding station's sends fail.
    let sent = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), flooder).await })
        .expect("the server closed the connection")
        .unwrap();
    println!("{sent} requests sent before the server closed the connection");
    let (ws, _d) = client("ws1", "workstation", "127.0.2.14", &addr, &pin);
    assert!(ws.hold(12, None).granted());
}

#[test]
fn thousands_of_network_grants_are_listed_and_counted_once_per_station() {
    const GRANTS: u64 = 3000;
    let vendor = Vendor::new();
    let (server, _sd, addr, pin) = server_with(
        &vendor,
        &["{ code: 13, name: thirteen, quantity: 1, counting: station-share }"],
        "10",
    );
    let rt = runtime_for_raw_stations();
    let _link = rt.block_on(async {
        let mut link = raw_station(&addr, &pin, "busy", false).await;
        for request in 1..=GRANTS {
            meterd::frame::send(&mut link, &access("busy", request, 13))
                .await
                .unwrap();
            let answer: FromServer = meterd::frame::recv(&mut link).await.unwrap();
            assert!(matches!(answer, FromServer::Granted { .. }), "{answer:?}");
        }
        link
    });
    assert_eq!(allocations(&server).len() as u64, GRANTS);
    assert_eq!(server_usage(&server, 13), (1, GRANTS));
}
