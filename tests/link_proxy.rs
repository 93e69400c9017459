//! `ufvmm link-proxy` on loopback: the link model between two real TCP peers.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// An echo server on a free loopback port; returns its port.
fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 65536];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Starts a proxy to `target` with `link`; returns it and the port it listens on.
fn proxy(target: u16, link: &str) -> (Proc, u16) {
    let mut child = ufvmm()
        .args([
            "link-proxy",
            "--listen",
            "0",
            "--connect",
            &target.to_string(),
            "--link",
            link,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn proxy");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "link-proxy: listening on 127.0.0.1:PORT, forwarding to ..."
    let port = line
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    (Proc::new(child), port)
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to proxy");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Sends `data` and reads as many bytes back; returns them and the time taken.
fn round_trip(s: &mut TcpStream, data: &[u8]) -> (Vec<u8>, Duration) {
    let t = Instant::now();
    let mut w = s.try_clone().unwrap();
    let out = data.to_vec();
    let writer = std::thread::spawn(move || w.write_all(&out).unwrap());
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).expect("echo");
    writer.join().unwrap();
    (back, t.elapsed())
}

#[test]
fn latency_and_bandwidth_slow_the_connection() {
    let (_p, port) = proxy(echo_server(), "latency=50ms");
    let mut s = connect(port);
    let (back, took) = round_trip(&mut s, b"ping");
    assert_eq!(back, b"ping");
    assert!(
        took >= Duration::from_millis(100),
        "round trip {took:?} under 2 x 50 ms"
    );

    let (_p, port) = proxy(echo_server(), "bandwidth=2MiB/s");
    let mut s = connect(port);
    let data: Vec<u8> = (0..1_048_576u32).map(|i| i as u8).collect();
    let (back, took) = round_trip(&mut s, &data);
    assert_eq!(back, data);
    assert!(
        took >= Duration::from_millis(450),
        "1 MiB at 2 MiB/s took {took:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn a_stall_window_holds_data_back_until_it_ends() {
    let (_p, port) = proxy(echo_server(), "stall=1500ms@300ms");
    let mut s = connect(port);
    std::thread::sleep(Duration::from_millis(400));
    let (back, took) = round_trip(&mut s, b"during the stall");
    assert_eq!(back, b"during the stall");
    // Sent inside the window (which ends 1.8 s after the proxy started): held back.
    assert!(took >= Duration::from_millis(600), "{took:?}");
}

#[test]
fn a_half_close_is_passed_on_after_the_data() {
    // The server reads to the end, then answers: the answer must come back.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            let _ = s.write_all(format!("got {} bytes", got.len()).as_bytes());
        }
    });
    let (_p, port) = proxy(target, "latency=20ms");
    let mut s = connect(port);
    s.write_all(b"hello").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "got 5 bytes");
}

#[test]
fn disconnect_drops_the_connection_even_when_the_server_does_not_read() {
    // A server that accepts and never reads: the client's writes pile up in the proxy.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = l.local_addr().unwrap().port();
    let _keep = std::thread::spawn(move || {
        let conns: Vec<TcpStream> = l.incoming().flatten().take(2).collect();
        std::thread::sleep(Duration::from_secs(30));
        drop(conns);
    });
    let (_p, port) = proxy(target, "disconnect@1s");
    let s = connect(port);
    let mut w = s.try_clone().unwrap();
    let t = Instant::now();
    let writer = std::thread::spawn(move || {
        let chunk = vec![7u8; 65536];
        while w.write_all(&chunk).is_ok() {}
    });
    // The client's writes fail once the proxy drops the connection.
    writer.join().unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn disconnect_drops_the_connection_and_a_new_one_works() {
    let (_p, port) = proxy(echo_server(), "disconnect@1s");
    let mut s = connect(port);
    let (back, _) = round_trip(&mut s, b"before");
    assert_eq!(back, b"before");
    let t = Instant::now();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection to be dropped, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(3));
    // The schedule is past its drop: a reconnection carries on.
    let mut s2 = connect(port);
    assert_eq!(round_trip(&mut s2, b"after").0, b"after");
}

#[test]
fn corrupt_flips_exactly_one_byte_from_the_connecting_side_only() {
    // The server first sends 1000 bytes (the other direction), then records what it gets.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let _ = s.write_all(&[0x33u8; 1000]);
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            let _ = tx.send(got);
        }
    });
    let (_p, port) = proxy(target, "corrupt@0ms");
    let mut s = connect(port);
    let mut from_server = vec![0u8; 1000];
    s.read_exact(&mut from_server).unwrap();
    assert_eq!(
        from_server,
        vec![0x33u8; 1000],
        "the server's direction was changed"
    );
    s.write_all(&[0x55u8; 1000]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("server got the data");
    assert_eq!(got.len(), 1000);
    assert_eq!(got.iter().filter(|&&b| b != 0x55).count(), 1);
}

#[test]
fn bad_proxy_arguments_are_refused() {
    let r = run_raw(
        &[
            "link-proxy",
            "--listen",
            "0",
            "--connect",
            "1",
            "--link",
            "disconnect@x",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(r.code(), Some(2), "{}", r.explain());
    assert!(r.stderr.contains("--link"), "{}", r.explain());
    let r = run_raw(
        &["link-proxy", "--listen", "not-an-address", "--connect", "1"],
        Duration::from_secs(10),
    );
    assert_eq!(r.code(), Some(1), "{}", r.explain());
    assert!(r.stderr.contains("--listen"), "{}", r.explain());
    // A VM's page source has no connection to drop.
    let r = run_raw(&["run", "--link", "disconnect@1s"], Duration::from_secs(10));
    assert_eq!(r.code(), Some(2), "{}", r.explain());
}

#[test]
fn an_unreachable_target_drops_the_client_and_the_proxy_stays_up() {
    // A port nobody listens on: bind one, then free it.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (_p, port) = proxy(dead, "latency=1ms");
    for _ in 0..2 {
        let mut s = connect(port);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4];
        // Closed (or reset), not left hanging until the timeout.
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("the client was not dropped: {other:?}"),
        }
    }
}
