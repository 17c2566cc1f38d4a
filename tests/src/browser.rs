//! A real headless browser for page tests: Debian's `chromium`, driven over the Chrome DevTools
//! Protocol on a pipe (`--remote-debugging-pipe`: NUL-terminated JSON on fds 3 and 4), so no
//! WebSocket client and no open debugging port. One page per browser; everything is stopped on
//! drop.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long one protocol call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The browser binary: `FLIGHTNODE_CHROMIUM`, else `chromium` on `PATH`; `None` when neither.
pub fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLIGHTNODE_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("chromium"))
            .find(|p| p.is_file())
    })
}

/// A headless chromium with one page attached.
pub struct Browser {
    child: Child,
    to: std::io::PipeWriter,
    from: Receiver<Value>,
    next_id: u64,
    session: String,
    /// Protocol events received so far (the page's network requests, console, …), oldest first.
    pub events: Vec<Value>,
    profile: tempfile::TempDir,
}

impl Browser {
    /// Starts `chromium` headless with a fresh profile and a `width`×`height` viewport, and
    /// attaches to its page.
    pub fn start(chromium: &Path, width: u32, height: u32) -> Result<Browser> {
        let profile = tempfile::Builder::new()
            .prefix("flightnode-chromium-")
            .tempdir()?;
        let (cmd_r, cmd_w) = std::io::pipe()?;
        let (resp_r, resp_w) = std::io::pipe()?;
        let log = std::fs::File::create(profile.path().join("chromium.log"))?;
        let mut cmd = Command::new(chromium);
        cmd.args([
            "--headless=new",
            // The test may run as root, where chromium's sandbox refuses to start.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-sync",
            "--disable-component-update",
            "--hide-scrollbars",
            "--mute-audio",
            &format!("--window-size={width},{height}"),
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        let (child_in, child_out) = (cmd_r.as_raw_fd(), resp_w.as_raw_fd());
        // SAFETY: only async-signal-safe calls (fcntl, dup2, close) between fork and exec. The
        // copies above 10 first: a pipe end that already is fd 3 or 4 would keep its
        // close-on-exec flag through a dup2 onto itself.
        unsafe {
            cmd.pre_exec(move || {
                let a = libc::fcntl(child_in, libc::F_DUPFD, 10);
                let b = libc::fcntl(child_out, libc::F_DUPFD, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(a);
                libc::close(b);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", chromium.display()))?;
        // Only the browser holds these ends now, so its exit is an EOF here.
        drop(cmd_r);
        drop(resp_w);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(resp_r);
            let mut buf = Vec::new();
            while matches!(reader.read_until(0, &mut buf), Ok(n) if n > 0) {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                    && tx.send(v).is_err()
                {
                    return;
                }
                buf.clear();
            }
        });
        let mut b = Browser {
            child,
            to: cmd_w,
            from: rx,
            next_id: 0,
            session: String::new(),
            events: Vec::new(),
            profile,
        };
        let targets = b.call_browser("Target.getTargets", &json!({}))?;
        let page = targets["targetInfos"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["targetId"].as_str())
            .context("chromium shows no page target")?
            .to_owned();
        let attached = b.call_browser(
            "Target.attachToTarget",
            &json!({ "targetId": page, "flatten": true }),
        )?;
        attached["sessionId"]
            .as_str()
            .context("Target.attachToTarget returned no sessionId")?
            .clone_into(&mut b.session);
        for domain in ["Page.enable", "Runtime.enable", "Network.enable"] {
            b.call(domain, &json!({}))?;
        }
        b.call(
            "Emulation.setDeviceMetricsOverride",
            &json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )?;
        Ok(b)
    }

    fn send(&mut self, method: &str, params: &Value, session: Option<String>) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(0);
        self.to
            .write_all(&bytes)
            .with_context(|| format!("sending {method} to chromium:\n{}", self.log()))?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from.recv_timeout(left) {
                Ok(v) if v["id"].as_u64() == Some(id) => {
                    if let Some(e) = v.get("error") {
                        bail!("{method}: {e}");
                    }
                    return Ok(v["result"].clone());
                }
                Ok(v) => {
                    if v.get("method").is_some() {
                        self.events.push(v);
                    }
                }
                Err(RecvTimeoutError::Timeout) => bail!("{method}: no answer within {CALL_TIMEOUT:?}"),
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("{method}: chromium closed the pipe:\n{}", self.log())
                }
            }
        }
    }

    fn call_browser(&mut self, method: &str, params: &Value) -> Result<Value> {
        self.send(method, params, None)
    }

    /// A protocol call on the page.
    pub fn call(&mut self, method: &str, params: &Value) -> Result<Value> {
        let session = self.session.clone();
        self.send(method, params, Some(session))
    }

    /// Navigates and waits until the document has loaded.
    pub fn open(&mut self, url: &str) -> Result<()> {
        let nav = self.call("Page.navigate", &json!({ "url": url }))?;
        if let Some(e) = nav.get("errorText") {
            bail!("opening {url}: {e}");
        }
        let deadline = Instant::now() + CALL_TIMEOUT;
        while self.eval("document.readyState")? != json!("complete") {
            if Instant::now() > deadline {
                bail!("{url} did not finish loading");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Evaluates `expression` in the page (promises awaited) and returns its value as JSON.
    pub fn eval(&mut self, expression: &str) -> Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            &json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("evaluating {expression:?}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// A PNG of the viewport down to the end of the page's content, written to `path`.
    pub fn screenshot(&mut self, path: &Path) -> Result<()> {
        use base64::Engine;
        let size = self.eval(
            "[document.documentElement.clientWidth,
              Math.min(window.innerHeight, Math.ceil(document.body.getBoundingClientRect().bottom))]",
        )?;
        let (width, height) = (
            size[0].as_f64().unwrap_or(800.0),
            size[1].as_f64().unwrap_or(600.0),
        );
        let clip = json!({ "x": 0, "y": 0, "width": width, "height": height, "scale": 1 });
        let shot = self.call(
            "Page.captureScreenshot",
            &json!({ "format": "png", "clip": clip }),
        )?;
        let data = shot["data"].as_str().context("no screenshot data")?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// URLs of every request the page made so far.
    pub fn requested_urls(&mut self) -> Vec<String> {
        let late: Vec<Value> = self
            .from
            .try_iter()
            .filter(|v| v.get("method").is_some())
            .collect();
        self.events.extend(late);
        self.events
            .iter()
            .filter(|e| e["method"] == "Network.requestWillBeSent")
            .filter_map(|e| e["params"]["request"]["url"].as_str().map(str::to_owned))
            .collect()
    }

    /// What chromium printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.profile.path().join("chromium.log")).unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
