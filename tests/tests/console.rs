//! The web console in a real browser: Debian's headless Chromium driven
//! through its chromedriver (WebDriver, the `fantoccini` client) against
//! the real server, guestkeyd, libvirtd and qemu-img. An operator signs in
//! (a wrong password refused), creates an encrypted volume, encrypts a
//! cleartext one that a managed pool offers, re-encrypts a volume (the
//! confirmation step first) and watches its progress bar, sets a rotation
//! policy (a bad one refused with nothing changed) and reads the verified
//! audit log, which names them. Certificates (an admin's works, none or a
//! host's does not) and forged forms (no CSRF token, another Origin) are
//! checked with curl. No page ever holds a key.
//!
//! With `GUESTKEY_CONSOLE_SCREENSHOTS=DIR` the main pages are saved there
//! as PNG (docs/console/ holds the committed ones).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use guestkey_tests::image::qemu_io;
use guestkey_tests::stack::Stack;
use guestkey_tests::{run, virsh};

const PASSWORD: &str = "a long console password";

/// chromedriver on a free port, with the browser profile it runs
/// Chromium on; killed at the end with every Chromium process of that
/// profile (a test that fails leaves none running, writing into it).
struct Driver(Child, u16, PathBuf);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let profile = format!("--user-data-dir={}", self.2.display());
        let _ = Command::new("pkill")
            .args(["-9", "-f", "--", &profile])
            .status();
    }
}

fn chromedriver(profile: &Path) -> Driver {
    let port = guestkey_testkit::free_port();
    let child = Command::new("/usr/bin/chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian's chromium-driver; run scripts/setup)");
    let end = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "chromedriver did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    Driver(child, port, profile.to_owned())
}

async fn browser(driver: &Driver, profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    // The server's certificate is signed by its own CA, which this
    // throw-away browser profile does not know.
    caps.insert("acceptInsecureCerts".into(), serde_json::json!(true));
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--ignore-certificate-errors",
                "--disable-crash-reporter", "--disable-breakpad",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.1))
        .await
        .expect("a Chromium session")
}

/// The page's HTML once it holds `want` (the page may reload itself).
async fn wait_for_text(c: &Client, want: &str, secs: u64) -> String {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let src = c.source().await.unwrap_or_default();
        if src.contains(want) {
            return src;
        }
        assert!(Instant::now() < end, "{want:?} never showed:\n{src}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn fill(c: &Client, css: &str, text: &str) {
    let e = c.find(Locator::Css(css)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(text).await.unwrap();
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn shot(c: &Client, dir: &Path, name: &str) {
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
    std::fs::write(dir.join(format!("{name}.png")), &png).unwrap();
    if let Ok(keep) = std::env::var("GUESTKEY_CONSOLE_SCREENSHOTS") {
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::write(Path::new(&keep).join(format!("{name}.png")), &png).unwrap();
    }
}

/// A volume's page (by name), its HTML.
async fn volume_page(c: &Client, base: &str, s: &Stack, name: &str) -> String {
    let id = s.json(&["volume", "show", name])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    c.goto(&format!("{base}/volumes/{id}")).await.unwrap();
    c.source().await.unwrap()
}

/// curl against the console: (status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let mut all = vec!["-sk", "-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    let out = Command::new("curl").args(&all).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// `guestkeyctl console-user add NAME`, the password on stdin.
fn set_password(s: &Stack, name: &str, password: &str) {
    let mut add = s
        .ctl_command(&["console-user", "add", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        writeln!(add.stdin.take().unwrap(), "{password}").unwrap();
    }
    let out = add.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_works_in_the_console_in_a_real_browser() {
    let port = guestkey_testkit::free_port();
    let config = format!(
        "[console]\nlisten = \"127.0.0.1:{port}\"\n[retry]\ninitial_delay_ms = 100\nmax_delay_ms = 500\n"
    );
    let mut s = Stack::start_configured(&[], Some(&config));
    let base = format!("https://127.0.0.1:{port}");
    let shots = s.dir.join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();

    // A login, made by an admin with guestkeyctl (the password on stdin).
    set_password(&s, "alice", PASSWORD);
    assert_eq!(s.audit("console-user.set").len(), 1);

    let profile = s.dir.join("chromium-profile");
    let driver = chromedriver(&profile);
    let c = browser(&driver, &profile).await;

    // Not signed in: to the sign-in page; a wrong password is refused.
    c.goto(&format!("{base}/volumes")).await.unwrap();
    wait_for_text(&c, "Sign in", 10).await;
    fill(&c, "input[name=name]", "alice").await;
    fill(&c, "input[name=password]", "not the password").await;
    click(&c, "form[action='/login'] button").await;
    wait_for_text(&c, "Wrong login name or password", 10).await;
    shot(&c, &shots, "sign-in").await;
    fill(&c, "input[name=name]", "alice").await;
    fill(&c, "input[name=password]", PASSWORD).await;
    click(&c, "form[action='/login'] button").await;
    let hosts = wait_for_text(&c, "Signed in as", 10).await;
    assert!(
        hosts.contains(&s.host) && hosts.contains("enrolled"),
        "{hosts}"
    );
    shot(&c, &shots, "hosts").await;

    // "Encrypt this volume": a new one. A bad size first: refused with
    // what to fix, nothing made.
    c.goto(&format!("{base}/encrypt")).await.unwrap();
    fill(
        &c,
        "form[action='/encrypt/create'] input[name=pool]",
        &s.pool,
    )
    .await;
    fill(
        &c,
        "form[action='/encrypt/create'] input[name=name]",
        "web-disk",
    )
    .await;
    fill(&c, "form[action='/encrypt/create'] input[name=size]", "ten").await;
    click(&c, "form[action='/encrypt/create'] button").await;
    let refused = wait_for_text(&c, "Nothing was changed", 10).await;
    assert!(refused.contains("size"), "{refused}");
    assert!(!s.ctl(&["volume", "show", "web-disk"]).status.success());
    c.goto(&format!("{base}/encrypt")).await.unwrap();
    fill(
        &c,
        "form[action='/encrypt/create'] input[name=pool]",
        &s.pool,
    )
    .await;
    fill(
        &c,
        "form[action='/encrypt/create'] input[name=name]",
        "web-disk",
    )
    .await;
    fill(&c, "form[action='/encrypt/create'] input[name=size]", "48M").await;
    click(&c, "form[action='/encrypt/create'] button").await;
    // Its page follows the creation (it reloads itself meanwhile).
    wait_for_text(&c, "Volume web-disk", 10).await;
    let page = wait_for_text(&c, "<span class=\"state ready\">ready</span>", 60).await;
    assert!(page.contains("qcow2"), "{page}");

    // A cleartext volume of a managed pool is offered; one click encrypts it.
    virsh(&[
        "vol-create-as",
        &s.pool,
        "plain.qcow2",
        "16M",
        "--format",
        "qcow2",
    ])
    .unwrap();
    let m = s.ctl(&["pool", "manage", "--host", &s.host, &s.pool]);
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
    c.goto(&format!("{base}/encrypt")).await.unwrap();
    wait_for_text(&c, "offer-plain.qcow2", 20).await;
    shot(&c, &shots, "encrypt").await;
    click(&c, "#offer-plain\\.qcow2 button").await;
    wait_for_text(&c, "Volume plain.qcow2", 30).await;
    wait_for_text(&c, "<span class=\"state ready\">ready</span>", 60).await;
    let plain = s.dir.join("pool").join("plain.qcow2");
    let info = run("qemu-img", &["info", "-U", plain.to_str().unwrap()]).unwrap();
    assert!(info.contains("encrypted: yes"), "{info}");

    // Re-encrypt now: data first, so that the copy takes a while at the
    // limit and its progress shows.
    let v = s.json(&["volume", "show", "web-disk"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let path = s.dir.join("pool").join("web-disk");
    let key = s.server_key(&id);
    qemu_io(&s.dir, &path, key.expose_secret(), "write -P 0x5c 0 40M").unwrap();
    c.goto(&format!("{base}/volumes/{id}/rekey")).await.unwrap();
    fill(&c, "input[name=mib_per_sec]", "4").await;
    // Without the confirmation box: refused, nothing changed.
    click(&c, "form button.danger").await;
    wait_for_text(&c, "Tick the box", 10).await;
    assert_eq!(s.json(&["volume", "show", "web-disk"])["key_generation"], 1);
    c.goto(&format!("{base}/volumes/{id}/rekey")).await.unwrap();
    fill(&c, "input[name=mib_per_sec]", "4").await;
    click(&c, "input[name=confirm]").await;
    click(&c, "form button.danger").await;
    let running = wait_for_text(&c, "<progress max=", 60).await;
    assert!(running.contains("re-encrypting"), "{running}");
    shot(&c, &shots, "rekey-progress").await;
    let done = wait_for_text(&c, "<dd id=\"volume-generation\">2</dd>", 120).await;
    assert!(done.contains("Last deep rekey"), "{done}");
    assert!(!done.contains("<progress"), "{done}");
    shot(&c, &shots, "volume").await;

    // Policies: a bad age refused, a good one listed.
    c.goto(&format!("{base}/policies")).await.unwrap();
    fill(&c, "input[name=target]", &s.pool).await;
    fill(&c, "input[name=max_key_age]", "ninety").await;
    click(&c, "form[action='/policies/set'] button").await;
    wait_for_text(&c, "Nothing was changed", 10).await;
    assert!(s.json(&["policy", "list"]).as_array().unwrap().is_empty());
    c.goto(&format!("{base}/policies")).await.unwrap();
    fill(&c, "input[name=target]", &s.pool).await;
    fill(&c, "input[name=max_key_age]", "90d").await;
    click(&c, "form[action='/policies/set'] button").await;
    wait_for_text(&c, "90 d 0 h", 10).await;
    shot(&c, &shots, "policies").await;

    // The audit log: verified, filtered, naming the admin.
    c.goto(&format!("{base}/audit?action=volume.rekey"))
        .await
        .unwrap();
    let audit = wait_for_text(&c, "audit-verified", 10).await;
    assert!(audit.contains("Verified:"), "{audit}");
    assert!(
        audit.contains("admin:alice@console") && audit.contains("volume.rekey-requested"),
        "{audit}"
    );
    assert!(
        !audit.contains("key.released"),
        "the filter keeps other actions out"
    );
    c.goto(&format!("{base}/audit")).await.unwrap();
    wait_for_text(&c, "audit-verified", 10).await;
    shot(&c, &shots, "audit").await;
    c.goto(&format!("{base}/volumes")).await.unwrap();
    let list = wait_for_text(&c, "volume-web-disk", 10).await;
    shot(&c, &shots, "volumes").await;
    c.goto(&format!("{base}/guests")).await.unwrap();
    wait_for_text(&c, "Migrations in flight", 10).await;

    // No page holds a key of either volume.
    let pages = [list, audit, done, running, page];
    for name in ["web-disk", "plain.qcow2"] {
        let id = s.json(&["volume", "show", name])["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let key = s.server_key(&id);
        let text = String::from_utf8_lossy(key.expose_secret()).into_owned();
        let shown = volume_page(&c, &base, &s, name).await;
        for p in pages.iter().chain([&shown]) {
            assert!(!p.contains(&text), "a key of {name} on a page");
        }
    }
    for action in [
        "volume.create-requested",
        "volume.encrypt-requested",
        "volume.rekey-requested",
        "policy.set",
        "console.signed-in",
    ] {
        let recs = s.audit(action);
        assert!(
            recs.iter().any(|r| r["actor"] == "admin:alice@console"),
            "{action}: {recs:?}"
        );
    }

    // A new password ends the sessions made under the old one.
    set_password(&s, "alice", "the second password");
    c.goto(&format!("{base}/volumes")).await.unwrap();
    wait_for_text(&c, "action=\"/login\"", 10).await;
    fill(&c, "input[name=name]", "alice").await;
    fill(&c, "input[name=password]", "the second password").await;
    click(&c, "form[action='/login'] button").await;
    wait_for_text(&c, "Signed in as", 10).await;

    // Sessions are in the database: a restarted server (or another
    // replica) knows them.
    s.run_server();
    c.goto(&format!("{base}/volumes")).await.unwrap();
    wait_for_text(&c, "Signed in as <strong>alice@console</strong>", 30).await;

    // Sign out: the session ends.
    click(&c, "header form button").await;
    wait_for_text(&c, "Sign in", 10).await;
    c.goto(&format!("{base}/volumes")).await.unwrap();
    wait_for_text(&c, "action=\"/login\"", 10).await;
    c.close().await.unwrap();

    // Outside the browser: an admin certificate is an admin; forged forms
    // and other certificates are refused.
    let admin = s.dir.join("server/admin");
    let cert = admin.join("admin.pem");
    let key = admin.join("admin.key");
    let cert_args = [
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ];
    let mut a = cert_args.to_vec();
    let url = format!("{base}/policies");
    a.push(&url);
    let (code, body) = curl(&a);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("Signed in as <strong>admin</strong>"),
        "{body}"
    );
    let mut a = cert_args.to_vec();
    let set = format!("{base}/policies/set");
    a.extend([
        "-d",
        "scope=pool&target=x&max_key_age=1d&mode=deep&csrf=forged",
        &set,
    ]);
    let (code, body) = curl(&a);
    assert_eq!(code, 403, "{body}");
    let mut a = cert_args.to_vec();
    a.extend([
        "-H",
        "Origin: https://attacker.example",
        "-d",
        "scope=pool&target=x&max_key_age=1d&mode=deep",
        &set,
    ]);
    let (code, _) = curl(&a);
    assert_eq!(code, 403);
    let (code, _) = curl(&["-d", "scope=pool&target=x&max_key_age=1d&mode=deep", &set]);
    assert_eq!(code, 401, "no certificate, no session");
    assert_eq!(s.json(&["policy", "list"]).as_array().unwrap().len(), 1);
    // The host's certificate is of the hosts CA, which this listener does
    // not trust: the handshake fails.
    let host_cert = s.state_dir().join("tls.pem");
    let host_key = s.state_dir().join("tls.key");
    assert!(
        host_cert.exists() && host_key.exists(),
        "the host's certificate"
    );
    let (code, _) = curl(&[
        "--cert",
        host_cert.to_str().unwrap(),
        "--key",
        host_key.to_str().unwrap(),
        &url,
    ]);
    assert_eq!(code, 0, "a host certificate was accepted");

    // Bad input of every form: a message naming what to fix, and nothing
    // changed.
    let mut a = cert_args.to_vec();
    a.push(&url);
    let page = curl(&a).1;
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .unwrap()
        .to_owned();
    let snapshot = || {
        (
            s.json(&["volume", "list"]),
            s.json(&["policy", "list"]),
            s.json(&["host", "list"]),
            s.json(&["pool", "list"]),
        )
    };
    let before = snapshot();
    let id = s.json(&["volume", "show", "web-disk"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (h, p) = (&s.host, &s.pool);
    let cases: Vec<(String, String, &str)> = vec![
        (
            "/encrypt/create".into(),
            format!("host={h}&pool={p}&name=bad%20name&size=1M&format=qcow2"),
            "volume name",
        ),
        (
            "/encrypt/create".into(),
            format!("host={h}&pool={p}&name=ok-name&size=1M&format=vmdk"),
            "vmdk",
        ),
        (
            "/encrypt/create".into(),
            format!("host=no-such-host&pool={p}&name=ok-name&size=1M&format=qcow2"),
            "no-such-host",
        ),
        (
            "/encrypt/create".into(),
            format!("host={h}&pool={p}&name=ok-name&size=0&format=qcow2"),
            "size",
        ),
        (
            "/encrypt/create".into(),
            format!("host={h}&pool={p}&name=web-disk&size=1M&format=qcow2"),
            "already exists",
        ),
        (
            "/encrypt/convert".into(),
            format!("host={h}&pool={p}&name=missing.qcow2&format=qcow2"),
            "missing.qcow2",
        ),
        (
            format!("/volumes/{id}/rekey"),
            "kind=sideways&confirm=yes".into(),
            "sideways",
        ),
        (
            format!("/volumes/{id}/rekey"),
            "kind=deep&confirm=yes&mib_per_sec=0".into(),
            "MiB/s",
        ),
        (
            "/volumes/no-such-volume/rekey".into(),
            "kind=deep&confirm=yes".into(),
            "no-such-volume",
        ),
        (
            "/policies/set".into(),
            "scope=galaxy&target=x&max_key_age=1d&mode=deep".into(),
            "galaxy",
        ),
        (
            "/policies/set".into(),
            "scope=volume&target=no-such-volume&max_key_age=1d&mode=deep".into(),
            "no-such-volume",
        ),
        (
            "/policies/set".into(),
            "scope=pool&target=x&max_key_age=1d&mode=medium".into(),
            "medium",
        ),
        (
            "/policies/remove".into(),
            "scope=pool&target=never-set".into(),
            "never-set",
        ),
        (
            "/hosts/no-such-host/revoke".into(),
            "confirm=yes".into(),
            "no-such-host",
        ),
        (format!("/hosts/{h}/revoke"), String::new(), "I am sure"),
        (
            "/pending/rq-000000000000".into(),
            "decision=approve".into(),
            "rq-000000000000",
        ),
        (
            "/pending/rq-000000000000".into(),
            "decision=maybe".into(),
            "Approve or Deny",
        ),
    ];
    for (path, form, says) in &cases {
        let body = format!("csrf={csrf}&{form}");
        let target = format!("{base}{path}");
        let mut a = cert_args.to_vec();
        a.extend(["-d", body.as_str(), target.as_str()]);
        let (code, page) = curl(&a);
        assert!((400..500).contains(&code), "{path} {form}: {code}\n{page}");
        assert!(page.contains(says), "{path} {form}: no {says:?} in\n{page}");
        assert!(
            page.contains("Nothing was changed"),
            "{path} {form}:\n{page}"
        );
    }
    for (path, says) in [
        ("/volumes/no-such-volume".to_owned(), "no-such-volume"),
        (format!("/audit?action={}", "x".repeat(300)), "at most 256"),
        ("/no/such/page".to_owned(), "no such page"),
    ] {
        let target = format!("{base}{path}");
        let mut a = cert_args.to_vec();
        a.push(&target);
        let (code, page) = curl(&a);
        assert!((400..500).contains(&code), "{path}: {code}\n{page}");
        assert!(page.contains(says), "{path}: no {says:?} in\n{page}");
    }
    assert_eq!(snapshot(), before, "a refused form changed something");

    // Ten wrong passwords of one login: its sign-ins are refused for a
    // while, even with the right one; the refusals name no password.
    set_password(&s, "bob", "bob's own password");
    let login = format!("{base}/login");
    for _ in 0..10 {
        let (code, _) = curl(&["-d", "name=bob&password=guess+guess+guess", &login]);
        assert_eq!(code, 401);
    }
    let (code, page) = curl(&["-d", "name=bob&password=bob%27s+own+password", &login]);
    assert_eq!(code, 429, "{page}");
    assert!(page.contains("Too many failed sign-ins"), "{page}");
    let (code, _) = curl(&["-d", "name=hunter2hunter2&password=x", &login]);
    assert_eq!(code, 401);
    let text = serde_json::to_string(&s.audit("refused")).unwrap();
    assert!(
        !text.contains("guess") && !text.contains("hunter2"),
        "{text}"
    );
    drop(driver);
}
