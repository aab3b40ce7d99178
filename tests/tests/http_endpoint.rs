//! The agent's HTTP endpoint end to end: health and readiness while etcd is away,
//! the bounds as hostile clients push on them, and the live page as a browser
//! (headless Chromium) draws it. Every client runs inside the host's namespace,
//! where the endpoint listens on loopback.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use netagent_tests::cluster::{wait_for, Cluster};
use netagent_tests::{in_netns, root_test, sh, sh_ok};

const PORT: u16 = 8181;
const ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), PORT);

fn listen_on_loopback(c: &mut Cluster, host: usize) {
    c.extra_tables[host - 1] = format!("[http]\nlisten = \"{ADDR}\"\n");
}

/// `curl` inside host `host`'s namespace: (status, body); status 0 when nothing answered.
fn get(c: &Cluster, host: usize, path: &str, extra: &str) -> (u16, String) {
    let out = sh(&format!(
        "ip netns exec {} curl -s --max-time 3 {extra} -w '\\n%{{http_code}}' http://{ADDR}{path}",
        c.bed.hosts[host - 1].netns
    ));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Runs `work` on a thread inside host `host`'s namespace and waits for it.
fn inside<T: Send + 'static>(
    c: &Cluster,
    host: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    in_netns(&c.bed.hosts[host - 1].netns, work)
        .join()
        .expect("client thread")
}

/// Everything the server sends until it closes (or `limit` passes).
fn read_all(conn: &mut TcpStream, limit: Duration) -> String {
    conn.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the server closed `conn` (EOF or reset) within `limit`, not just went quiet.
fn closed_within(conn: &mut TcpStream, limit: Duration) -> bool {
    conn.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn health_and_readiness_answer_while_etcd_is_away() {
    root_test!();
    let mut c = Cluster::new(1, 3);
    listen_on_loopback(&mut c, 1);
    c.stop_etcd();
    c.spawn_agent(1);
    wait_for(
        Duration::from_secs(10),
        "/healthz while etcd is down",
        || get(&c, 1, "/healthz", "").0 == 200,
    );
    assert_eq!(get(&c, 1, "/healthz", ""), (200, "ok\n".into()));
    let (code, body) = get(&c, 1, "/readyz", "");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.starts_with(&format!(
            "not ready: waiting for etcd at {}",
            c.etcd_endpoint()
        )),
        "{body}"
    );
    assert_eq!(body.lines().count(), 1, "one line: {body}");
    let (code, _) = get(&c, 1, "/metrics", "");
    assert_eq!(code, 200);
    let (code, picture) = get(&c, 1, "/api/picture", "");
    assert_eq!(code, 200);
    let picture: serde_json::Value = serde_json::from_str(&picture).unwrap();
    assert_eq!(picture["state"], "starting");

    c.start_etcd();
    wait_for(Duration::from_secs(20), "/readyz once etcd is back", || {
        get(&c, 1, "/readyz", "") == (200, "ready\n".into())
    });
    let (_, picture) = get(&c, 1, "/api/picture", "");
    let picture: serde_json::Value = serde_json::from_str(&picture).unwrap();
    assert_eq!(picture["state"], "ok");
    assert_eq!(picture["hosts"][0]["name"], "host1");

    // Running, then the store goes away again: not ready, naming it.
    c.stop_etcd();
    wait_for(
        Duration::from_secs(30),
        "/readyz to name etcd again",
        || {
            let (code, body) = get(&c, 1, "/readyz", "");
            code == 503 && body.starts_with("not ready: etcd at https://")
        },
    );
    assert_eq!(get(&c, 1, "/healthz", "").0, 200);
}

#[test]
fn bounds_hold_against_hostile_clients() {
    root_test!();
    let mut c = Cluster::new(1, 3);
    listen_on_loopback(&mut c, 1);
    c.start_agent(1);
    wait_for(Duration::from_secs(20), "/readyz", || {
        get(&c, 1, "/readyz", "").0 == 200
    });

    // Methods and paths.
    assert_eq!(get(&c, 1, "/healthz", "-X POST").0, 405);
    assert_eq!(get(&c, 1, "/nowhere", "").0, 404);
    let head = sh_ok(&format!(
        "ip netns exec {} curl -s -I --max-time 3 http://{ADDR}/metrics",
        c.bed.hosts[0].netns
    ));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");

    // 64 connections at once; the 65th is closed at once while they are served.
    let (extra_closed, first_still_served, later_served) = inside(&c, 1, || {
        let held: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(ADDR).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(300));
        let mut extra = TcpStream::connect(ADDR).unwrap();
        let extra_closed = closed_within(&mut extra, Duration::from_secs(1));
        let mut first = held[0].try_clone().unwrap();
        first
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let answer = read_all(&mut first, Duration::from_secs(2));
        drop(held);
        std::thread::sleep(Duration::from_millis(300));
        let mut later = TcpStream::connect(ADDR).unwrap();
        later.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
        let later = read_all(&mut later, Duration::from_secs(2));
        (extra_closed, answer, later)
    });
    assert!(extra_closed, "the 65th connection was kept open");
    assert!(
        first_still_served.starts_with("HTTP/1.1 200"),
        "{first_still_served}"
    );
    assert!(later_served.starts_with("HTTP/1.1 200"), "{later_served}");

    // A 9 KiB head is refused with 431; a 7 KiB one is served.
    let (large, fits) = inside(&c, 1, || {
        let ask = |pad: usize| {
            let mut conn = TcpStream::connect(ADDR).unwrap();
            let req = format!(
                "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
                "a".repeat(pad)
            );
            let _ = conn.write_all(req.as_bytes());
            read_all(&mut conn, Duration::from_secs(3))
        };
        (ask(9 << 10), ask(7 << 10))
    });
    assert!(large.starts_with("HTTP/1.1 431"), "{large}");
    assert!(fits.starts_with("HTTP/1.1 200"), "{fits}");

    // Slowloris: a silent client and one trickling a byte every 300 ms are both cut
    // off after 5 s, while others are served meanwhile.
    let silent = inside(&c, 1, || {
        let conn = TcpStream::connect(ADDR).unwrap();
        let started = Instant::now();
        std::thread::spawn(move || {
            let mut conn = conn;
            let said = read_all(&mut conn, Duration::from_secs(10));
            (started.elapsed(), said)
        })
    });
    let trickling = inside(&c, 1, || {
        let mut conn = TcpStream::connect(ADDR).unwrap();
        let started = Instant::now();
        std::thread::spawn(move || {
            for b in b"GET /healthz HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                .iter()
            {
                if conn.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            started.elapsed()
        })
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        get(&c, 1, "/healthz", "").0,
        200,
        "served while two clients dawdle"
    );
    let (after, said) = silent.join().unwrap();
    assert!(
        after >= Duration::from_millis(4500) && after < Duration::from_secs(8),
        "silent connection closed after {after:?}"
    );
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    let cut = trickling.join().unwrap();
    assert!(
        cut < Duration::from_secs(9),
        "trickling client kept for {cut:?}"
    );

    // 16 event streams at once; the 17th is told 503.
    let (streams_ok, extra) = inside(&c, 1, || {
        let open = || {
            let mut conn = TcpStream::connect(ADDR).unwrap();
            conn.write_all(b"GET /events HTTP/1.1\r\n\r\n").unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut buf = [0u8; 4096];
            let n = conn.read(&mut buf).unwrap_or(0);
            (conn, String::from_utf8_lossy(&buf[..n]).into_owned())
        };
        let streams: Vec<(TcpStream, String)> = (0..16).map(|_| open()).collect();
        let ok = streams
            .iter()
            .filter(|(_, s)| s.starts_with("HTTP/1.1 200") && s.contains("text/event-stream"))
            .count();
        let (_, extra) = open();
        drop(streams);
        (ok, extra)
    });
    assert_eq!(streams_ok, 16);
    assert!(extra.starts_with("HTTP/1.1 503"), "{extra}");
}

/// Headless Chromium inside host `host`'s namespace, with its own profile and HOME.
/// The page draws the picture it is served with before its load event, where
/// `--dump-dom` and `--screenshot` take it (a virtual-time budget would wait for ever
/// on the page's event stream).
fn chromium(c: &Cluster, host: usize, args: &str) -> String {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let profile = c.dir.join(format!("chromium-{stamp}"));
    std::fs::create_dir_all(&profile).unwrap();
    sh_ok(&format!(
        "cd {p} && ip netns exec {ns} env HOME={p} timeout 60 chromium --headless --no-sandbox \
         --disable-gpu --disable-dev-shm-usage --no-first-run --user-data-dir={p}/profile \
         --timeout=5000 {args} http://{ADDR}/ 2>/dev/null",
        p = profile.display(),
        ns = c.bed.hosts[host - 1].netns
    ))
}

/// The PNG's width and height, when `bytes` is one.
fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.len() < 24 || &bytes[..8] != b"\x89PNG\r\n\x1a\n" || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    Some((be(&bytes[16..20]), be(&bytes[20..24])))
}

/// The text of the element that opens with `start` in `dom`, up to the next
/// element that opens with `end` (or the end).
fn section<'a>(dom: &'a str, start: &str, end: &str) -> &'a str {
    let Some(from) = dom.find(start) else {
        return "";
    };
    let rest = &dom[from..];
    let to = rest[start.len()..]
        .find(end)
        .map_or(rest.len(), |i| i + start.len());
    &rest[..to]
}

#[test]
fn live_page_shows_a_replica_attached_on_another_host() {
    root_test!();
    let mut c = Cluster::new(3, 3);
    for h in 1..=3 {
        listen_on_loopback(&mut c, h);
        c.start_agent(h);
    }
    c.create_network("front", "100.64.0.0/16");
    c.create_network("back", "100.65.0.0/16");
    let ns: Vec<String> = (0..6).map(|i| c.bed.container(&format!("p{i}"))).collect();
    c.attach(1, &ns[0], "front", &["--service", "web", "--name", "web-a"]);
    c.attach(3, &ns[1], "front", &["--service", "web", "--name", "web-c"]);
    c.attach(1, &ns[2], "back", &["--service", "db", "--name", "db-a"]);
    c.attach(3, &ns[3], "back", &["--service", "db", "--name", "db-c"]);
    wait_for(Duration::from_secs(20), "/readyz on host1", || {
        get(&c, 1, "/readyz", "").0 == 200
    });

    let before = chromium(&c, 1, "--dump-dom");
    let web = section(&before, "data-service=\"web\"", "data-service=");
    assert!(
        web.contains("web-a") && web.contains("web-c"),
        "page before: {before}"
    );
    assert!(
        !web.contains("data-host=\"host2\""),
        "host2 has no web replica yet: {web}"
    );

    // A client of the event stream, as the page holds it, sees the change pushed.
    let pushed = in_netns(&c.bed.hosts[0].netns, || {
        let mut conn = TcpStream::connect(ADDR).unwrap();
        conn.write_all(b"GET /events HTTP/1.1\r\n\r\n").unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 16 << 10];
        let mut events = 0;
        while let Ok(n @ 1..) = conn.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen);
            events = text.matches("event: picture\ndata: {").count();
            if text.contains("\"web-b\"") {
                return (events, true);
            }
        }
        (events, false)
    });
    std::thread::sleep(Duration::from_secs(1));
    let on_host2 = c.attach(2, &ns[4], "front", &["--service", "web", "--name", "web-b"]);
    c.attach(2, &ns[5], "back", &["--service", "db", "--name", "db-b"]);
    // Host 1 learns of it through etcd; the page through its event stream.
    wait_for(
        Duration::from_secs(10),
        "host1's picture to show web-b",
        || get(&c, 1, "/api/picture", "").1.contains("web-b"),
    );
    let (events, pushed) = pushed.join().unwrap();
    assert!(
        pushed,
        "the event stream never carried web-b ({events} pictures)"
    );
    assert!(
        events >= 2,
        "the first picture comes on connect, the change after"
    );
    let dom = chromium(&c, 1, "--dump-dom");
    let web = section(&dom, "data-service=\"web\"", "data-service=");
    let host2 = section(web, "data-host=\"host2\"", "data-host=");
    assert!(
        host2.contains(&on_host2.to_string()) && host2.contains("web-b"),
        "web's replica on host2 ({on_host2} web-b) is not drawn under host2: {web}"
    );
    let hosts = section(&dom, "id=\"hosts\"", "</section>");
    for h in ["host1", "host2", "host3"] {
        assert!(hosts.contains(h), "{h} missing from the hosts: {hosts}");
    }

    let shot = c.dir.join("live-page.png");
    chromium(
        &c,
        1,
        &format!(
            "--window-size=1200,760 --hide-scrollbars --screenshot={}",
            shot.display()
        ),
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    let size = png_size(&png);
    assert_eq!(size, Some((1200, 760)), "not a PNG of the window's size");
    assert!(
        png.len() > 20_000,
        "a screenshot of {} bytes is blank",
        png.len()
    );
    // NETAGENT_README_SCREENSHOT=path keeps it (the README's picture).
    if let Ok(keep) = std::env::var("NETAGENT_README_SCREENSHOT") {
        std::fs::copy(&shot, Path::new(&keep)).unwrap();
    }
}
