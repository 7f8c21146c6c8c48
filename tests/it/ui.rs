//! The web UI in a real browser: headless Chromium from Debian's packages,
//! driven through chromedriver (WebDriver), against a scheduler and workers
//! as processes. Skipped, with a note, where chromedriver is not installed
//! (`.ci/run` installs it).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::cluster::Cluster;

const TOKEN: &str = "ui-test-token-0123456789";

/// chromedriver and a browser session on it.
struct Browser {
    driver: Child,
    client: Client,
    rt: tokio::runtime::Runtime,
}

impl Browser {
    fn start() -> Option<Self> {
        let Ok(path) = which("chromedriver") else {
            eprintln!(
                "chromedriver is not installed (apt-get install chromium chromium-driver): browser tests skipped"
            );
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new(path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"]}),
        );
        let client = rt
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&format!("http://127.0.0.1:{port}")),
            )
            .expect("a Chromium session");
        Some(Self { driver, client, rt })
    }

    fn goto(&self, url: &str) {
        self.rt.block_on(self.client.goto(url)).unwrap();
    }

    fn url(&self) -> String {
        self.rt.block_on(self.client.current_url()).unwrap().to_string()
    }

    fn js(&self, script: &str) -> Value {
        self.rt.block_on(self.client.execute(script, vec![])).unwrap()
    }

    /// `css`'s text ("" when absent); read again if the page replaced the
    /// element meanwhile (a live update).
    fn text(&self, css: &str) -> String {
        for _ in 0..5 {
            if let Ok(text) = self
                .rt
                .block_on(async { self.client.find(Locator::Css(css)).await?.text().await })
            {
                return text;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        String::new()
    }

    fn fill(&self, css: &str, value: &str) {
        self.rt
            .block_on(async {
                let field = self.client.find(Locator::Css(css)).await?;
                field.clear().await?;
                field.send_keys(value).await
            })
            .unwrap();
    }

    fn click(&self, css: &str) {
        self.rt
            .block_on(async { self.client.find(Locator::Css(css)).await?.click().await })
            .unwrap();
    }

    /// The text of every element `css` matches, in page order.
    fn texts(&self, css: &str) -> Vec<String> {
        let texts = self.js(&format!(
            "return [...document.querySelectorAll('{css}')].map(e => e.innerText)"
        ));
        texts
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    }

    /// Wait until the page's address passes `test` (a click's navigation done).
    fn wait_url(&self, test: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let url = self.url();
            if test(&url) {
                return url;
            }
            assert!(Instant::now() < deadline, "still at {url}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until `css`'s text is `expected` (the page updating itself).
    fn wait_text(&self, css: &str, expected: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.text(css);
            if now == expected {
                return;
            }
            assert!(Instant::now() < deadline, "{css}: {now:?}, never {expected:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self, name: &str) {
        let png = self.rt.block_on(self.client.screenshot()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        // Kept in the repository (README) when asked; checked either way.
        if std::env::var_os("COURIER_UPDATE_SCREENSHOTS").is_some() {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/screenshots");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), png).unwrap();
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let client = self.client.clone();
        let _ = self.rt.block_on(client.close());
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

const GATE: &str = "steps:
  - name: a
    echo: first
  - name: gate
    depends: [a]
    approval:
      message: \"Go on after ${a.output}?\"
      timeout: 10m
  - name: b
    depends: [gate]
    echo: second
";

const SHOW: &str = "params:
  text: \"<script>document.title='pwned'</script><b>bold</b>\"
steps:
  - name: show
    echo: \"${text}\"
";

/// Wait until run `id`'s `gate` step waits for approval.
fn wait_for_approval(cluster: &Cluster, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while step_status(&cluster.run(id), "gate") != "waiting_approval" {
        assert!(Instant::now() < deadline, "{}", cluster.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn step_status(run: &Value, name: &str) -> String {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .map(|s| s["status"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[test]
fn the_web_ui_logs_in_submits_updates_live_and_shows_outputs_as_text() {
    let Some(browser) = Browser::start() else { return };
    let cluster = Cluster::builder()
        .env("COURIER_API_TOKEN", TOKEN)
        .workers(2)
        .workflow("gate", GATE)
        .workflow("show", SHOW)
        .start();
    let api = cluster.api.clone();

    // Without a session: the login form; a wrong token is refused.
    browser.goto(&format!("{api}/ui/runs"));
    assert!(browser.url().ends_with("/ui/login"), "{}", browser.url());
    browser.fill("#token", "wrong");
    browser.click("form button[type=submit]");
    browser.wait_text("p.error", "wrong token", Duration::from_secs(10));
    browser.fill("#token", TOKEN);
    browser.click("form button[type=submit]");
    browser.wait_url(|u| u.ends_with("/ui/runs"));
    let cookie = browser.js("return document.cookie");
    assert_eq!(cookie, "", "the session cookie is HttpOnly: {cookie}");

    // The submit form starts a run; its page follows it to the end; the
    // output, untrusted text, shows as text.
    browser.goto(&format!("{api}/ui/workflows"));
    browser.click("#wf-show form button[type=submit]");
    let url = browser.wait_url(|u| u.contains("/ui/runs/"));
    let shown = url.rsplit('/').next().unwrap().to_string();
    browser.wait_text("#run-status", "succeeded", Duration::from_secs(30));
    assert_eq!(
        browser.text("#step-show pre.out"),
        "<script>document.title='pwned'</script><b>bold</b>"
    );
    assert_eq!(
        browser.js("return document.querySelectorAll('#step-show pre.out b, #step-show pre.out script').length"),
        0
    );
    assert!(!browser.js("return document.title").as_str().unwrap().contains("pwned"));

    // A run waiting for approval: approved elsewhere (the API) while its page
    // is open, the page shows the rest finishing, without a reload.
    let gated = cluster.submit("gate", &[]).unwrap();
    wait_for_approval(&cluster, &gated);
    browser.goto(&format!("{api}/ui/runs/{gated}"));
    assert_eq!(browser.text("#step-gate .status"), "waiting_approval");
    assert!(browser.text("#step-gate").contains("approval: Go on after first?"));
    browser.js("window.courierMarker = 42; return null");
    let approved = cluster
        .http(reqwest::Method::POST, &format!("/api/runs/{gated}/steps/gate/approve"))
        .send()
        .unwrap();
    assert!(approved.status().is_success());
    browser.wait_text("#run-status", "succeeded", Duration::from_secs(30));
    assert_eq!(
        browser.js("return window.courierMarker"),
        42,
        "the page was not reloaded"
    );
    for (step, output) in [("a", "first"), ("gate", "approved"), ("b", "second")] {
        assert_eq!(browser.text(&format!("#step-{step} .status")), "succeeded");
        assert_eq!(browser.text(&format!("#step-{step} pre.out")), output);
    }
    assert_eq!(
        browser.js("return document.querySelectorAll('svg.dag g.node.st-succeeded').length"),
        3
    );
    browser.screenshot("run.png");

    // At phone width the run page still fits: nothing wider than the screen
    // but what scrolls inside its own box (the graph, wide tables).
    browser.rt.block_on(browser.client.set_window_size(390, 844)).unwrap();
    browser.goto(&format!("{api}/ui/runs/{gated}"));
    let overflow = browser.js("return document.documentElement.scrollWidth - document.documentElement.clientWidth");
    assert_eq!(overflow, 0, "the page is wider than a phone");
    browser.rt.block_on(browser.client.set_window_size(1280, 1000)).unwrap();
    browser.goto(&format!("{api}/ui/runs/{gated}"));

    // The runs page lists both, newest first, with their status.
    browser.goto(&format!("{api}/ui/runs"));
    let rows = browser.texts("#rows tr");
    assert!(rows[0].contains(&gated) && rows[0].contains("succeeded"), "{rows:?}");
    assert!(rows[1].contains(&shown) && rows[1].contains("succeeded"), "{rows:?}");
    browser.screenshot("runs.png");

    // A second approval, this time with the page's own form and a comment.
    let second = cluster.submit("gate", &[]).unwrap();
    wait_for_approval(&cluster, &second);
    browser.goto(&format!("{api}/ui/runs/{second}"));
    browser.fill("#step-gate input[name=comment]", "looks right to me");
    browser.click("#step-gate form.decide button[type=submit]");
    browser.wait_text("#run-status", "succeeded", Duration::from_secs(30));
    assert_eq!(browser.text("#step-gate pre.out"), "looks right to me");

    // With the session but without the form's CSRF token, from the page
    // itself: refused, and nothing cancelled.
    let third = cluster.submit("gate", &[]).unwrap();
    let status = browser.rt.block_on(browser.client.execute_async(
        &format!(
            "const done = arguments[0]; fetch('/ui/runs/{third}/cancel', {{method: 'POST', body: new URLSearchParams({{csrf: 'wrong'}})}}).then(r => done(r.status))"
        ),
        vec![],
    ));
    assert_eq!(status.unwrap(), 403);
    assert_eq!(cluster.run(&third)["status"], "running");
    // Cancelled by its button.
    browser.goto(&format!("{api}/ui/runs/{third}"));
    browser.click("form.inline button.danger");
    browser.wait_text("#run-status", "cancelled", Duration::from_secs(30));

    // A param given twice in the submit form is refused, as the API does,
    // and no run is started.
    let runs = || {
        let list: Value = cluster
            .http(reqwest::Method::GET, "/api/runs?limit=1000")
            .send()
            .unwrap()
            .json()
            .unwrap();
        list.as_array().unwrap().len()
    };
    let before = runs();
    let answer = browser.rt.block_on(browser.client.execute_async(
        "const done = arguments[0]; const csrf = document.querySelector('input[name=csrf]').value; \
         fetch('/ui/workflows/show/runs', {method: 'POST', body: new URLSearchParams([['csrf', csrf], ['param.text', 'a'], ['param.text', 'b']])}) \
           .then(r => r.text().then(t => done([r.status, t])))",
        vec![],
    ));
    let answer = answer.unwrap();
    assert_eq!(answer[0], 400, "{answer}");
    assert!(
        answer[1]
            .as_str()
            .unwrap()
            .contains("the param &quot;text&quot; is given twice"),
        "{answer}"
    );
    assert_eq!(runs(), before);
    // So is a field the form does not have, as the API refuses it.
    let answer = browser.rt.block_on(browser.client.execute_async(
        "const done = arguments[0]; const csrf = document.querySelector('input[name=csrf]').value; \
         fetch('/ui/workflows/show/runs', {method: 'POST', body: new URLSearchParams([['csrf', csrf], ['foo', 'bar']])}) \
           .then(r => r.text().then(t => done([r.status, t])))",
        vec![],
    ));
    let answer = answer.unwrap();
    assert_eq!(answer[0], 400, "{answer}");
    assert!(
        answer[1].as_str().unwrap().contains("unknown field &quot;foo&quot;"),
        "{answer}"
    );
    assert_eq!(runs(), before);

    // Logged out: back to the login form.
    browser.click("nav form button[type=submit]");
    browser.wait_url(|u| u.ends_with("/ui/login"));
    browser.goto(&format!("{api}/ui/runs"));
    assert!(browser.url().ends_with("/ui/login"), "{}", browser.url());

    // Without a session, no live stream; the API keeps its own token.
    let bare = reqwest::blocking::Client::new();
    assert_eq!(bare.get(format!("{api}/ui/runs/live")).send().unwrap().status(), 401);
    assert_eq!(
        bare.get(format!("{api}/ui/runs/{gated}/live")).send().unwrap().status(),
        401
    );
    assert_eq!(bare.get(format!("{api}/api/runs")).send().unwrap().status(), 401);

    // A form posted from another origin is refused, even with the session.
    let forged = reqwest::blocking::Client::new()
        .post(format!("{api}/ui/runs/{gated}/cancel"))
        .header("Origin", "http://evil.example")
        .form(&[("csrf", "x")])
        .send()
        .unwrap();
    assert_eq!(forged.status(), 403);
    // Without the session, nothing but the login page.
    let anonymous = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{api}/ui/runs/{gated}"))
        .send()
        .unwrap();
    assert_eq!(anonymous.status(), 303);
}

#[test]
fn a_two_thousand_step_run_page_renders_within_bounds() {
    let Some(browser) = Browser::start() else { return };
    let mut yaml = String::from("steps:\n");
    for i in 0..2000 {
        yaml.push_str(&format!("  - name: s{i}\n    echo: out-{i}\n"));
    }
    let cluster = Cluster::builder().workers(2).workflow("wide", &yaml).start();
    let id = cluster.submit("wide", &[]).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(180));
    assert_eq!(run["status"], "succeeded");
    browser.goto(&format!("{}/ui/runs/{id}", cluster.api));
    let ms = browser.js("const n = performance.getEntriesByType('navigation')[0]; return n.loadEventEnd - n.startTime");
    let rows = browser.js("return document.querySelectorAll('#steps tbody tr').length");
    assert_eq!(rows, 2000);
    let ms = ms.as_f64().unwrap();
    eprintln!("a 2,000-step run page: loaded in {ms:.0} ms in headless Chromium");
    assert!(ms < 5000.0, "{ms} ms");
}

#[test]
fn the_dead_letters_page_lists_reasons_and_requeues_and_the_queues_page_reads_the_broker() {
    let Some(browser) = Browser::start() else { return };
    let cluster = Cluster::builder().env("COURIER_API_TOKEN", TOKEN).workers(1).start();
    let api = cluster.api.clone();
    cluster.publish_raw("default", b"not a task", "poison-ui", vec![]);
    crate::reliability::wait_dead(&cluster, 1);
    browser.goto(&format!("{api}/ui/login"));
    browser.fill("#token", TOKEN);
    browser.click("form button[type=submit]");
    browser.wait_url(|u| u.ends_with("/ui/runs"));

    browser.goto(&format!("{api}/ui/dead"));
    let row = browser.text("#dead tbody tr");
    assert!(row.contains("poison-ui") && row.contains("default"), "{row}");
    let reason = browser.text("#dead tbody tr pre.error");
    assert!(!reason.is_empty() && reason != "unknown", "{reason}");
    assert_eq!(cluster.dead_depth(), 1, "listing puts them back");
    // Requeued: the worker gets it again, and refuses it again.
    let refusals = |log: &str| log.matches("refusing task; dead-lettering it").count();
    assert_eq!(refusals(&cluster.worker_log("w1")), 1);
    browser.click("#dead tbody tr form button[type=submit]");
    browser.wait_url(|u| u.ends_with("/ui/dead"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while refusals(&cluster.worker_log("w1")) < 2 {
        assert!(Instant::now() < deadline, "{}", cluster.logs());
        std::thread::sleep(Duration::from_millis(100));
    }

    browser.goto(&format!("{api}/ui/queues"));
    let rows = browser.texts("#queues tbody tr");
    let results = format!("{}.results", cluster.namespace);
    assert!(rows.iter().any(|r| r.starts_with(&results)), "{rows:?}");
    assert!(
        rows.iter()
            .any(|r| r.starts_with(&format!("{}.tasks.default", cluster.namespace))),
        "{rows:?}"
    );
}

#[test]
fn the_dead_letters_page_holds_one_body_at_a_time_and_opens_from_a_link_on_another_site() {
    let cluster = Cluster::builder().workers(0).start();
    let dead = courier_amqp::Names::new(cluster.namespace.clone()).dead();
    // 16 dead letters of 4 MiB: 64 MiB in the queue.
    let big = vec![b'x'; 4 << 20];
    for i in 0..16 {
        cluster.publish(&dead, "results", &big, (&format!("big-{i}"), "run"), Vec::new());
    }
    crate::reliability::wait_dead(&cluster, 16);
    let before = cluster.scheduler_peak_rss_mib();
    let page = cluster.http(reqwest::Method::GET, "/ui/dead").send().unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().unwrap();
    assert!(page.contains("big-0") && page.contains("big-15"), "{page}");
    assert!(page.contains(&(4 << 20).to_string()), "the size of each: {page}");
    let grew = cluster.scheduler_peak_rss_mib() - before;
    eprintln!("the dead-letters page over 64 MiB of dead letters: peak RSS +{grew:.1} MiB");
    assert!(grew < 24.0, "the page grew the scheduler by {grew:.1} MiB");
    assert_eq!(cluster.dead_depth(), 16, "listing puts them back");

    // A link the user follows from another site (RabbitMQ's management UI
    // on another port) gets a page that reads nothing, with a link of the
    // UI's own; a page that embeds it or fetches it is refused.
    let visit = |site: &str, mode: &str, dest: &str, user: Option<&str>| {
        let mut request = cluster
            .http(reqwest::Method::GET, "/ui/dead")
            .header("sec-fetch-site", site)
            .header("sec-fetch-mode", mode)
            .header("sec-fetch-dest", dest);
        if let Some(user) = user {
            request = request.header("sec-fetch-user", user);
        }
        let answer = request.send().unwrap();
        (answer.status().as_u16(), answer.text().unwrap())
    };
    for site in ["same-site", "cross-site"] {
        let (status, page) = visit(site, "navigate", "document", Some("?1"));
        assert_eq!(status, 200, "{page}");
        assert!(page.contains(r#"href="/ui/dead""#) && !page.contains("big-0"), "{page}");
    }
    for (site, mode, dest, user) in [
        ("cross-site", "navigate", "document", None),
        ("cross-site", "navigate", "iframe", Some("?1")),
        ("same-site", "no-cors", "image", None),
        ("cross-site", "cors", "empty", None),
    ] {
        assert_eq!(visit(site, mode, dest, user).0, 403, "{site} {mode} {dest}");
    }
    let (status, page) = visit("same-origin", "navigate", "document", Some("?1"));
    assert_eq!(status, 200);
    assert!(page.contains("big-15"), "{page}");
    assert_eq!(cluster.dead_depth(), 16);
}
