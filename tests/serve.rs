//! `taming serve`: a load test (20 concurrent samples served in order, 20 malformed requests
//! answered 4xx while the server keeps serving), a closed page stopping its sampling, and the
//! page in a real browser (headless Chromium through chromedriver's WebDriver API): it samples,
//! a PNG of the right size arrives and the page shows it (screenshot: target/serve-page.png).

mod common;
use common::gpu;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use taming::workflows::serve::{start, ServeOptions};

/// The small class-conditional model of the fixtures (32x32 images, 8x8 codes, 9 classes).
fn tiny_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/class_transformer/model.safetensors")
}

fn options() -> ServeOptions {
    ServeOptions { models: vec![tiny_model()], port: 0, max_upload: 64 << 10, ..Default::default() }
}

/// One HTTP/1.1 exchange: (status, body); chunked bodies are joined. `on_chunk` sees each chunk
/// as it arrives and may stop reading (returning false: the connection is dropped).
fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    mut on_chunk: impl FnMut(&str) -> bool,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    // (chromedriver refuses other Host headers than the address itself)
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 =
        line.split_whitespace().nth(1).unwrap_or_else(|| panic!("no status in {line:?}")).parse().unwrap();
    let (mut chunked, mut length) = (false, None);
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        let (name, value) = l.split_once(':').unwrap_or((&l, ""));
        chunked |= name == "transfer-encoding" && value.trim() == "chunked";
        if name == "content-length" {
            length = Some(value.trim().parse::<usize>().unwrap());
        }
    }
    let mut out = String::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let n = usize::from_str_radix(line.trim(), 16).unwrap_or_else(|_| panic!("bad chunk size {line:?}"));
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            let text = String::from_utf8_lossy(&chunk[..n]).into_owned();
            out.push_str(&text);
            if !on_chunk(&text) {
                return (status, out);
            }
        }
    } else if let Some(n) = length {
        let mut b = vec![0; n];
        r.read_exact(&mut b).unwrap();
        out = String::from_utf8_lossy(&b).into_owned();
    } else {
        r.read_to_string(&mut out).unwrap();
    }
    (status, out)
}

fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    exchange(addr, method, path, body, |_| true)
}

/// Server-sent events: (event, data).
fn events(stream: &str) -> Vec<(String, Value)> {
    stream
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            let event = b.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or("message").to_string();
            let data = b.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or("null");
            (event, serde_json::from_str(data).unwrap())
        })
        .collect()
}

fn png_of(data_url: &str) -> image::RgbImage {
    let b64 = data_url.strip_prefix("data:image/png;base64,").expect("a PNG data URL");
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

#[test]
fn twenty_concurrent_samples_in_order_and_malformed_requests_get_4xx() {
    let server = start(&gpu(), &options()).unwrap();
    let addr = server.addr;
    let (status, body) = request(addr, "GET", "/api/models", b"");
    assert_eq!(status, 200, "{body}");
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["models"][0]["kind"], "class");
    assert_eq!(models["models"][0]["classes"].as_array().unwrap().len(), 9);

    let threads: Vec<_> = (0..20u64)
        .map(|i| {
            std::thread::spawn(move || {
                let req = json!({"model": 0, "class": (i % 9).to_string(), "seed": i, "count": 1});
                request(addr, "POST", "/api/sample", req.to_string().as_bytes())
            })
        })
        .collect();
    let mut served = Vec::new();
    for t in threads {
        let (status, body) = t.join().unwrap();
        assert_eq!(status, 200, "{body}");
        let ev = events(&body);
        assert_eq!(ev[0].0, "queue", "the first event is the queue position");
        let (last, data) = ev.last().unwrap();
        assert_eq!(last, "done", "{body:.500}");
        assert!(ev.iter().any(|(e, d)| e == "progress" && d["done"] == 64 && d["total"] == 64));
        let img = png_of(data["png"].as_str().unwrap());
        assert_eq!((img.width(), img.height()), (32, 32));
        assert_eq!((data["width"].as_u64(), data["height"].as_u64()), (Some(32), Some(32)));
        served.push((data["ticket"].as_u64().unwrap(), data["order"].as_u64().unwrap()));
    }
    // First come, first served: each job ran in the order it was queued.
    served.sort();
    assert!(
        served.iter().enumerate().all(|(k, &(ticket, order))| ticket == k as u64 && order == k as u64),
        "{served:?}"
    );

    let too_big = vec![b'x'; 100 << 10];
    let malformed: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        ("POST", "/api/sample", b"{not json".to_vec(), 400),
        ("POST", "/api/sample", b"".to_vec(), 400),
        ("POST", "/api/sample", br#"{"model": 5, "class": "1"}"#.to_vec(), 404),
        ("POST", "/api/sample", br#"{"model": 0, "class": "no such class"}"#.to_vec(), 400),
        ("POST", "/api/sample", br#"{"model": 0, "class": "99"}"#.to_vec(), 400),
        ("POST", "/api/sample", br#"{"model": 0}"#.to_vec(), 400),
        ("POST", "/api/sample", br#"{"model": 0, "class": "1", "size": 30}"#.to_vec(), 400),
        ("POST", "/api/sample", br#"{"model": 0, "class": "1", "size": 16}"#.to_vec(), 400),
        ("POST", "/api/sample", br#"{"model": 0, "class": "1", "size": 4096}"#.to_vec(), 400),
        ("POST", "/api/sample", br#"{"model": 0, "class": "1", "size": [32]}"#.to_vec(), 400),
        ("POST", "/api/sample", br#"{"model": 0, "class": "1", "count": 0}"#.to_vec(), 400),
        ("POST", "/api/sample", br#"{"model": 0, "class": "1", "count": 1000}"#.to_vec(), 400),
        ("POST", "/api/sample", br#"{"model": 0, "class": "1", "temperature": 0}"#.to_vec(), 400),
        ("POST", "/api/sample", br#"{"model": 0, "class": "1", "top_p": 2}"#.to_vec(), 400),
        ("POST", "/api/sample", br#"{"model": 0, "class": "1", "cfg_scale": 3}"#.to_vec(), 400),
        ("POST", "/api/sample", br#"{"model": 0, "class": "1", "cond": "aGVsbG8="}"#.to_vec(), 400),
        ("POST", "/api/sample", br#"{"model": 0, "class": "1", "steps": 3}"#.to_vec(), 400),
        ("POST", "/api/sample", too_big, 413),
        ("POST", "/api/reconstruct?model=0", b"not an image".to_vec(), 400),
        ("GET", "/api/nothing", Vec::new(), 404),
    ];
    assert_eq!(malformed.len(), 20);
    for (method, path, body, want) in malformed {
        let (status, answer) = request(addr, method, path, &body);
        assert_eq!(status, want, "{method} {path} {:.80}: {answer}", String::from_utf8_lossy(&body));
        let msg: Value = serde_json::from_str(&answer).unwrap();
        assert!(!msg["error"].as_str().unwrap().is_empty());
    }
    // Still serving.
    let (status, body) = request(addr, "POST", "/api/sample", br#"{"model": 0, "class": "2", "count": 2}"#);
    assert_eq!(status, 200);
    let ev = events(&body);
    let img = png_of(ev.last().unwrap().1["png"].as_str().unwrap());
    assert_eq!(img.height(), 32);
    assert!(img.width() > 64, "two samples side by side");
    // A reconstruction: input | reconstruction, and its PSNR.
    let picture = image::RgbImage::from_fn(40, 36, |x, y| image::Rgb([(6 * x) as u8, (7 * y) as u8, 128]));
    let mut png = std::io::Cursor::new(Vec::new());
    picture.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let (status, body) = request(addr, "POST", "/api/reconstruct?model=0", png.get_ref());
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["score"].as_f64().unwrap() > 5.0, "PSNR {}", v["score"]);
    let pair = png_of(v["png"].as_str().unwrap());
    assert_eq!(pair.height(), 36, "input | reconstruction at the input's size (a multiple of the factor 4)");
    server.stop();
}

/// A depth-conditioned model: the condition image travels as a data URL, is encoded by the
/// model's cond stage, and the sample comes back; models list its condition; a missing or
/// undecodable condition is a 400.
#[test]
fn a_spatial_model_samples_from_an_uploaded_condition() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/depth_transformer/model.safetensors");
    let server = start(&gpu(), &ServeOptions { models: vec![model], ..options() }).unwrap();
    let addr = server.addr;
    let (_, body) = request(addr, "GET", "/api/models", b"");
    let info: Value = serde_json::from_str(&body).unwrap();
    let m = &info["models"][0];
    assert_eq!(m["kind"], "spatial");
    assert!(m["condition"].as_str().unwrap().contains("one-channel"), "{}", m["condition"]);
    let side = m["resolution"].as_u64().unwrap() as u32;
    let map = image::GrayImage::from_fn(side + 5, side, |x, y| image::Luma([(x * 9 + y * 3) as u8]));
    let mut png = std::io::Cursor::new(Vec::new());
    map.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png.get_ref()));
    let (status, body) =
        request(addr, "POST", "/api/sample", json!({"model": 0, "cond": url, "count": 2}).to_string().as_bytes());
    assert_eq!(status, 200, "{body:.300}");
    let ev = events(&body);
    let (last, data) = ev.last().unwrap();
    assert_eq!(last, "done", "{body:.300}");
    let img = png_of(data["png"].as_str().unwrap());
    assert_eq!(img.height(), side);
    for bad in [json!({"model": 0, "count": 1}), json!({"model": 0, "cond": "data:image/png;base64,AAAA"})] {
        let (status, body) = request(addr, "POST", "/api/sample", bad.to_string().as_bytes());
        assert_eq!(status, 400, "{bad}: {body}");
    }
    server.stop();
}

#[test]
fn a_closed_page_stops_its_sampling() {
    let server = start(&gpu(), &options()).unwrap();
    let addr = server.addr;
    // 16 samples at 4x the area (the sliding window): long enough to close the page midway.
    let req = json!({"model": 0, "class": "3", "count": 16, "size": 64});
    let (status, got) = exchange(addr, "POST", "/api/sample", req.to_string().as_bytes(), |c| !c.contains("progress"));
    assert_eq!(status, 200);
    assert!(got.contains("event: progress") && !got.contains("event: done"));
    let started = Instant::now();
    loop {
        let (_, body) = request(addr, "GET", "/api/queue", b"");
        let q: Value = serde_json::from_str(&body).unwrap();
        if q["cancelled"] == 1 && q["waiting"] == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the sampling did not stop: {q}");
        std::thread::sleep(Duration::from_millis(100));
    }
    server.stop();
}

/// A minimal WebDriver client (JSON over HTTP to chromedriver).
struct WebDriver {
    addr: SocketAddr,
    session: String,
}

impl WebDriver {
    fn call(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, answer) = request(addr, method, path, body.as_bytes());
        let v: Value = serde_json::from_str(&answer).unwrap_or_else(|_| panic!("{method} {path}: {answer:.300}"));
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        Self::call(self.addr, method, &format!("/session/{}{path}", self.session), body)
    }

    fn script(&self, js: &str) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({"script": js, "args": []})))
    }

    fn wait_for(&self, js: &str, timeout: Duration) -> Value {
        let started = Instant::now();
        loop {
            let v = self.script(js);
            if !v.is_null() && v != json!(false) && v != json!("") {
                return v;
            }
            assert!(started.elapsed() < timeout, "timed out waiting for {js}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn the_page_samples_in_a_real_browser() {
    let driver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("chromedriver not found: install Debian's chromium and chromium-driver (tools/setup.sh does)");
    let server = start(&gpu(), &options()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut chromedriver = std::process::Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let started = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let profile = tempdir("serve-browser");
    // As root in a container, headless, and without the background traffic a closed network refuses.
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,800",
        &format!("--user-data-dir={}", profile.display()),
    ];
    let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome",
        "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}}}});
    let session = WebDriver::call(addr, "POST", "/session", Some(caps));
    let wd = WebDriver { addr, session: session["sessionId"].as_str().unwrap().to_string() };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wd.cmd("POST", "/url", Some(json!({"url": format!("http://{}/", server.addr)})));
        wd.wait_for("return document.body.dataset.ready", Duration::from_secs(30));
        // The class list came from the model; choose one and press Sample.
        let classes = wd.script("return document.querySelectorAll('#s-class option').length");
        assert_eq!(classes, json!(9));
        wd.script("document.getElementById('s-class').value = '2'; document.getElementById('s-count').value = '4';");
        let button = wd.cmd("POST", "/element", Some(json!({"using": "css selector", "value": "#sample-btn"})));
        let id = button.as_object().unwrap().values().next().unwrap().as_str().unwrap().to_string();
        wd.cmd("POST", &format!("/element/{id}/click"), Some(json!({})));
        // Four 32x32 samples in a 2x2 grid (2-pixel gaps), decoded by the browser and shown.
        let size = wd.wait_for("return document.body.dataset.done", Duration::from_secs(180));
        assert_eq!(size, json!("66x66"));
        let shown = wd.script(
            "const i = document.getElementById('result'); const r = i.getBoundingClientRect(); \
             return !i.classList.contains('hidden') && r.width > 0 && i.complete && i.naturalWidth === 66;",
        );
        assert_eq!(shown, json!(true));
        let link = wd.script("return document.getElementById('download').href.slice(0, 22)");
        assert_eq!(link, json!("data:image/png;base64,"));
        let status = wd.script("return document.getElementById('s-status').textContent");
        assert!(status.as_str().unwrap().starts_with("Done"), "{status}");
        let shot = wd.cmd("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD.decode(shot.as_str().unwrap()).unwrap();
        let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/serve-page.png");
        std::fs::write(&out, &png).unwrap();
        let img = image::load_from_memory(&png).unwrap();
        assert!(img.width() >= 600, "screenshot {}x{}", img.width(), img.height());
    }));
    let _ = request(addr, "DELETE", &format!("/session/{}", wd.session), b"");
    let _ = chromedriver.kill();
    let _ = chromedriver.wait();
    server.stop();
    let _ = std::fs::remove_dir_all(&profile);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("taming-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
