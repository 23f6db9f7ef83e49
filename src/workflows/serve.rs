//! `taming serve`: the reference's interactive sampler (`scripts/sample_conditional.py`, a
//! streamlit app) as a local web page. One process: an HTTP server (tiny_http; a thread per
//! request) and one GPU thread that runs the jobs (samples, reconstructions) one at a time in
//! arrival order. A sample streams its progress to the page as server-sent events over a chunked
//! response (queue position, codes drawn, a partial image decoded every few rows, then the PNG);
//! a closed page stops its sampling. Requests are checked before they queue: bad input gets a 4xx
//! with a message and the server keeps serving. The page and its script are embedded (no CDN).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::images;
use super::maps::{self, Kind, Picture};
use super::sample::{decode_grid, generate, Partial, Pick, Rng, SampleGrid, SampleModel};
use crate::engine::{Gpu, Tape};
use crate::models::cond_transformer::Conditioning;
use crate::models::vqgan::Vqgan;

/// The page: HTML, CSS and script in one file, embedded in the binary.
const PAGE: &str = include_str!("serve_page.html");

/// Requests served at once (each sample holds its connection while it waits and runs).
const MAX_CONNECTIONS: usize = 128;

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub models: Vec<PathBuf>,
    pub host: String,
    pub port: u16,
    /// Largest request body (uploads) in bytes.
    pub max_upload: usize,
    /// Most samples per request.
    pub max_count: usize,
    /// Largest image side in pixels (samples and reconstructions).
    pub max_side: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            models: Vec::new(),
            host: "127.0.0.1".into(),
            port: 8000,
            max_upload: 16 << 20,
            max_count: 16,
            max_side: 1024,
        }
    }
}

/// A loaded model: a transformer (samples; its first stage reconstructs) or an autoencoder.
enum Loaded {
    Transformer(Box<SampleModel>),
    Autoencoder(Box<Vqgan>),
}

struct Entry {
    name: String,
    model: Loaded,
    info: Value,
}

impl Loaded {
    /// The autoencoder: the transformer's first stage, or the model itself.
    fn vq(&self) -> &Vqgan {
        match self {
            Loaded::Transformer(m) => &m.vq,
            Loaded::Autoencoder(vq) => vq,
        }
    }
}

/// A request's failure: the HTTP status and what to tell the page.
#[derive(Debug)]
struct HttpError(u16, String);

fn bad(msg: impl std::fmt::Display) -> HttpError {
    HttpError(400, msg.to_string())
}

/// What the page asks to sample (JSON body of POST /api/sample).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct SampleRequest {
    model: usize,
    #[serde(default)]
    class: Option<String>,
    /// Image side in pixels (square), or [height, width]; absent: the training size.
    #[serde(default)]
    size: Option<Value>,
    #[serde(default = "one")]
    temperature: f32,
    #[serde(default = "default_top_k")]
    top_k: usize,
    #[serde(default = "one")]
    top_p: f32,
    #[serde(default)]
    cfg_scale: Option<f32>,
    #[serde(default)]
    seed: u64,
    #[serde(default = "one_usize")]
    count: usize,
    /// The condition image of spatial models, as a data URL or bare base64.
    #[serde(default)]
    cond: Option<String>,
}

fn one() -> f32 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn default_top_k() -> usize {
    100
}

/// A sample request checked against its model, ready for the GPU thread.
struct SampleJob {
    model: usize,
    grid: SampleGrid,
    class: Option<String>,
    picture: Option<Picture>,
    pick: Pick,
    guidance: Option<(f32, u32)>,
    seed: u64,
    count: usize,
}

enum Work {
    Sample(SampleJob),
    Reconstruct { model: usize, picture: Picture },
}

/// What a job tells its request, in order.
enum Event {
    Started,
    Progress { done: usize, total: usize, preview: Option<String> },
    Sampled { png: Vec<u8>, width: u32, height: u32, order: u64, seconds: f64 },
    Reconstructed { png: Vec<u8>, score: f64, unit: &'static str },
    Failed(String),
}

struct Job {
    ticket: u64,
    work: Work,
    cancelled: Arc<AtomicBool>,
    events: mpsc::Sender<Event>,
}

/// The shared state: models, the queue's counters, the GPU thread's inbox.
struct State {
    gpu: Arc<Gpu>,
    entries: Vec<Entry>,
    opts: ServeOptions,
    /// Tickets handed out, and jobs finished (served in ticket order): a job waits behind
    /// `ticket - finished` others (0: it runs now).
    next_ticket: Mutex<u64>,
    finished: AtomicU64,
    cancelled: AtomicU64,
    connections: AtomicUsize,
    /// None once the server stops (the GPU thread ends when its inbox closes).
    inbox: Mutex<Option<mpsc::Sender<Job>>>,
}

/// A running server: its address, and a handle that stops it.
pub struct Running {
    pub addr: SocketAddr,
    server: Arc<tiny_http::Server>,
    state: Arc<State>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Stop accepting requests, let the queued jobs finish, and wait for the server's threads.
    pub fn stop(mut self) {
        self.server.unblock();
        self.state.inbox.lock().unwrap().take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Serve until the process ends.
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Load the models and start serving in the background.
pub fn start(gpu: &Arc<Gpu>, opts: &ServeOptions) -> Result<Running> {
    if opts.models.is_empty() {
        bail!("taming serve: no model to serve (give --model FILE)");
    }
    let mut entries = Vec::new();
    for path in &opts.models {
        entries.push(load_entry(gpu, path, entries.len())?);
    }
    let server = tiny_http::Server::http((opts.host.as_str(), opts.port))
        .map_err(|e| anyhow!("taming serve: cannot listen on {}:{}: {e}", opts.host, opts.port))?;
    let addr = server.server_addr().to_ip().ok_or_else(|| anyhow!("taming serve: not an IP address"))?;
    let server = Arc::new(server);
    let (inbox, jobs) = mpsc::channel::<Job>();
    let state = Arc::new(State {
        gpu: gpu.clone(),
        entries,
        opts: opts.clone(),
        next_ticket: Mutex::new(0),
        finished: AtomicU64::new(0),
        cancelled: AtomicU64::new(0),
        connections: AtomicUsize::new(0),
        inbox: Mutex::new(Some(inbox)),
    });
    let worker = {
        let state = state.clone();
        std::thread::spawn(move || run_jobs(&state, jobs))
    };
    let acceptor = {
        let (server, state) = (server.clone(), state.clone());
        std::thread::spawn(move || {
            for request in server.incoming_requests() {
                if state.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    state.connections.fetch_sub(1, Ordering::SeqCst);
                    let _ = respond_json(request, 503, &json!({"error": "the server is busy: too many requests"}));
                    continue;
                }
                let state = state.clone();
                std::thread::spawn(move || {
                    handle(&state, request);
                    state.connections.fetch_sub(1, Ordering::SeqCst);
                });
            }
        })
    };
    Ok(Running { addr, server, state, threads: vec![acceptor, worker] })
}

/// `taming serve`: load, listen, print the address, serve until interrupted.
pub fn serve(gpu: &Arc<Gpu>, opts: &ServeOptions) -> Result<()> {
    let running = start(gpu, opts)?;
    println!("serving {} model(s) on http://{} (Ctrl-C stops)", opts.models.len(), running.addr);
    running.wait();
    Ok(())
}

fn load_entry(gpu: &Arc<Gpu>, path: &Path, index: usize) -> Result<Entry> {
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| format!("model{index}"));
    let file = crate::models::weights::ModelFile::open(path)?;
    let model = match file.config.get("target").and_then(|t| t.as_str()) {
        Some(crate::models::cond_transformer::TARGET) => {
            Loaded::Transformer(Box::new(SampleModel::from_file(gpu, &file)?))
        }
        _ => Loaded::Autoencoder(Box::new(super::autoencode::vqgan_of(gpu, &file)?)),
    };
    let config = file.config.clone();
    let vq = model.vq();
    let vc = &vq.config;
    let mut info = json!({
        "index": index,
        "name": name,
        "file": path.display().to_string(),
        "resolution": vc.resolution,
        "factor": vc.factor(),
        "codebook": {"size": vq.codes(), "dim": vc.embed_dim},
        "input": Kind::of(vc)?.describe(),
        "config": config,
    });
    match &model {
        Loaded::Autoencoder(_) => info["kind"] = json!("autoencoder"),
        Loaded::Transformer(m) => {
            let (kind, classes) = match &m.cfg.cond {
                Conditioning::Class { n_classes } => {
                    let names: Vec<String> =
                        (0..*n_classes).map(|k| m.names.get(k).cloned().unwrap_or_else(|| k.to_string())).collect();
                    ("class", names)
                }
                Conditioning::Unconditional { .. } => ("unconditional", vec![]),
                Conditioning::Coord { .. } => ("coordinates", vec![]),
                Conditioning::Spatial { .. } => ("spatial", vec![]),
            };
            info["kind"] = json!(kind);
            info["classes"] = json!(classes);
            info["condition"] = json!(m.reads_pictures().map(|k| k.describe()));
            info["window"] = json!(m.cfg.latent_side()?);
            info["layers"] = json!(m.gpt.config.n_layer);
            info["width"] = json!(m.gpt.config.n_embd);
            // Whether other sizes than the training one work (the sliding window).
            info["any_size"] = json!(m.grid(Some((2 * vc.resolution, 2 * vc.resolution)), false).is_ok());
            let guided = m.cfg.null_token()?.is_some();
            info["guidance"] = json!(guided);
            info["default_cfg_scale"] = json!(if guided { super::sample::DEFAULT_CFG_SCALE } else { 1.0 });
        }
    }
    Ok(Entry { name, model, info })
}

// ---- The GPU thread --------------------------------------------------------------------------

fn run_jobs(state: &State, jobs: mpsc::Receiver<Job>) {
    let mut order = 0u64;
    for job in jobs {
        debug_assert_eq!(job.ticket, state.finished.load(Ordering::SeqCst));
        if job.cancelled.load(Ordering::SeqCst) {
            state.cancelled.fetch_add(1, Ordering::SeqCst);
        } else {
            let _ = job.events.send(Event::Started);
            let result = match &job.work {
                Work::Sample(s) => run_sample(state, s, &job, order),
                Work::Reconstruct { model, picture } => run_reconstruct(state, *model, picture, &job),
            };
            order += 1;
            if let Err(e) = result {
                if job.cancelled.load(Ordering::SeqCst) {
                    state.cancelled.fetch_add(1, Ordering::SeqCst);
                } else {
                    let _ = job.events.send(Event::Failed(format!("{e:#}")));
                }
            }
        }
        state.finished.fetch_add(1, Ordering::SeqCst);
    }
}

fn png_bytes(img: &image::RgbImage) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

fn data_url(png: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}

fn run_sample(state: &State, s: &SampleJob, job: &Job, order: u64) -> Result<()> {
    let started = Instant::now();
    let Loaded::Transformer(m) = &state.entries[s.model].model else { bail!("not a transformer") };
    let g = s.grid;
    let conds = m.conditions(&state.gpu, &g, s.class.as_deref(), s.picture.clone(), s.count)?;
    let null = s.guidance.map(|(_, t)| vec![t; conds[0].len()]);
    let guidance = s.guidance.zip(null.as_deref()).map(|((scale, _), null)| super::sample::Guidance { scale, null });
    let cols = (s.count as f64).sqrt().ceil() as usize;
    // A partial image every quarter of the rows (raster order only: other orders fill the grid
    // all over), the rows not drawn yet grey.
    let rows_per_preview = g.h.div_ceil(4).max(1);
    let raster = m.cfg.permuter.is_identity();
    let mut last_rows = 0;
    let mut last_sent = Instant::now();
    let mut progress = |p: Partial| -> Result<()> {
        if job.cancelled.load(Ordering::SeqCst) {
            bail!("cancelled: the page closed");
        }
        let rows = p.done / g.w;
        let preview = if raster && rows > last_rows && (rows - last_rows >= rows_per_preview) && p.done < p.total {
            last_rows = rows;
            let codes: Vec<Vec<u32>> = p
                .codes
                .iter()
                .map(|c| (0..g.h * g.w).map(|i| if i < rows * g.w { c[i] } else { 0 }).collect())
                .collect();
            let mut tiles = decode_grid(&m.vq, &codes, g.h, g.w)?;
            let f = m.vq.config.factor() as u32;
            for t in &mut tiles {
                for y in (rows as u32 * f)..t.height() {
                    for x in 0..t.width() {
                        t.put_pixel(x, y, image::Rgb([128, 128, 128]));
                    }
                }
            }
            Some(data_url(&png_bytes(&images::grid(&tiles, cols))?))
        } else {
            None
        };
        // At most ten counts a second, besides the previews and the last.
        if preview.is_some() || p.done == p.total || last_sent.elapsed() >= Duration::from_millis(100) {
            last_sent = Instant::now();
            let _ = job.events.send(Event::Progress { done: p.done, total: p.total, preview });
        }
        Ok(())
    };
    let mut rng = Rng::new(s.seed);
    let codes =
        generate(&m.gpt, &conds, g.cond_grid, g.h, g.w, g.window, &[], s.pick, guidance, &mut rng, &mut progress)?;
    let codes: Vec<Vec<u32>> = codes.iter().map(|r| m.cfg.permuter.undo(r)).collect::<Result<_>>()?;
    let tiles = decode_grid(&m.vq, &codes, g.h, g.w)?;
    let grid = images::grid(&tiles, cols);
    let _ = job.events.send(Event::Sampled {
        png: png_bytes(&grid)?,
        width: grid.width(),
        height: grid.height(),
        order,
        seconds: started.elapsed().as_secs_f64(),
    });
    Ok(())
}

fn run_reconstruct(state: &State, model: usize, picture: &Picture, job: &Job) -> Result<()> {
    let vq = state.entries[model].model.vq();
    let kind = Kind::of(&vq.config)?;
    let tape = Tape::inference();
    let p = vq.params.vars(&tape);
    let x = tape.constant(maps::batch_tensor(&state.gpu, kind, &[picture])?);
    let rec = maps::from_output(kind, &vq.forward(&tape, &p, &x)?.decoder_out.value)?.remove(0);
    let (score, unit) = maps::agreement(picture, &rec);
    let colors = vq.colorize.as_deref();
    let pair = images::side_by_side(&[&picture.to_rgb(colors), &rec.to_rgb(colors)]);
    let _ = job.events.send(Event::Reconstructed { png: png_bytes(&pair)?, score, unit });
    Ok(())
}

// ---- Requests --------------------------------------------------------------------------------

fn handle(state: &State, mut request: tiny_http::Request) {
    let method = request.method().clone();
    let url = request.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let result = match (&method, path) {
        (tiny_http::Method::Get, "/") | (tiny_http::Method::Get, "/index.html") => {
            let header = tiny_http::Header::from_bytes("Content-Type", "text/html; charset=utf-8").expect("header");
            let _ = request.respond(tiny_http::Response::from_string(PAGE).with_header(header));
            return;
        }
        (tiny_http::Method::Get, "/api/models") => {
            Ok(json!({"models": state.entries.iter().map(|e| e.info.clone()).collect::<Vec<_>>()}))
        }
        (tiny_http::Method::Get, "/api/queue") => Ok(json!({
            "waiting": *state.next_ticket.lock().unwrap() - state.finished.load(Ordering::SeqCst),
            "finished": state.finished.load(Ordering::SeqCst),
            "cancelled": state.cancelled.load(Ordering::SeqCst),
        })),
        (tiny_http::Method::Post, "/api/sample") => {
            match read_body(state, &mut request).and_then(|b| check_sample(state, &b)) {
                Ok(job) => return stream_sample(state, request, job),
                Err(e) => Err(e),
            }
        }
        (tiny_http::Method::Post, "/api/reconstruct") => {
            read_body(state, &mut request).and_then(|b| reconstruct(state, query, &b))
        }
        (_, "/" | "/index.html" | "/api/models" | "/api/queue" | "/api/sample" | "/api/reconstruct") => {
            Err(HttpError(405, format!("{method} is not allowed on {path}")))
        }
        _ => Err(HttpError(404, format!("no page {path}"))),
    };
    let _ = match result {
        Ok(v) => respond_json(request, 200, &v),
        Err(HttpError(status, msg)) => respond_json(request, status, &json!({ "error": msg })),
    };
}

fn respond_json(request: tiny_http::Request, status: u16, v: &Value) -> std::io::Result<()> {
    let header = tiny_http::Header::from_bytes("Content-Type", "application/json").expect("header");
    request.respond(tiny_http::Response::from_string(v.to_string()).with_status_code(status).with_header(header))
}

/// The request's body, at most `max_upload` bytes.
fn read_body(state: &State, request: &mut tiny_http::Request) -> Result<Vec<u8>, HttpError> {
    let limit = state.opts.max_upload;
    let too_big =
        || HttpError(413, format!("the request is larger than the server's limit of {limit} bytes (--max-upload-mb)"));
    if request.body_length().is_some_and(|n| n > limit) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    request
        .as_reader()
        .take(limit as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| bad(format!("reading the request: {e}")))?;
    if body.len() > limit {
        return Err(too_big());
    }
    Ok(body)
}

/// The bytes of a data URL or bare base64.
fn decode_base64(s: &str) -> Result<Vec<u8>, HttpError> {
    let b64 = s.split_once(";base64,").map_or(s, |(_, b)| b);
    base64::engine::general_purpose::STANDARD.decode(b64.trim()).map_err(|e| bad(format!("cond: not base64 ({e})")))
}

fn check_sample(state: &State, body: &[u8]) -> Result<SampleJob, HttpError> {
    let r: SampleRequest = serde_json::from_slice(body).map_err(|e| bad(format!("malformed request: {e}")))?;
    let entry = state.entries.get(r.model).ok_or_else(|| HttpError(404, format!("no model {}", r.model)))?;
    let Loaded::Transformer(m) = &entry.model else {
        return Err(bad(format!(
            "model {} ({}) is an autoencoder: it reconstructs, it does not sample",
            r.model, entry.name
        )));
    };
    let max = state.opts.max_count;
    if r.count == 0 || r.count > max {
        return Err(bad(format!("count {}: between 1 and {max} samples per request", r.count)));
    }
    if !(r.temperature.is_finite() && r.temperature > 0.0) {
        return Err(bad(format!("temperature {}: must be a positive number", r.temperature)));
    }
    if !(r.top_p > 0.0 && r.top_p <= 1.0) {
        return Err(bad(format!("top_p {}: must be in (0, 1]", r.top_p)));
    }
    let size = match &r.size {
        None | Some(Value::Null) => None,
        Some(v) => {
            let side =
                |v: &Value| v.as_u64().map(|n| n as usize).ok_or_else(|| bad(format!("size {v}: not a whole number")));
            let (h, w) = match v {
                Value::Array(a) if a.len() == 2 => (side(&a[0])?, side(&a[1])?),
                Value::Array(_) => return Err(bad("size: a number or [height, width]")),
                v => (side(v)?, side(v)?),
            };
            if h.max(w) > state.opts.max_side {
                return Err(bad(format!(
                    "size {h}x{w}: larger than the server's limit of {} pixels a side",
                    state.opts.max_side
                )));
            }
            Some((h, w))
        }
    };
    let grid = m.grid(size, false).map_err(|e| bad(format!("{e:#}").replace("--size ", "size ")))?;
    let guidance =
        m.guidance(r.cfg_scale).map_err(|e| bad(format!("{e:#}").replace("--cfg-scale ", "guidance scale ")))?;
    let picture = match (&r.cond, m.reads_pictures()) {
        (Some(data), Some(kind)) => {
            let bytes = decode_base64(data)?;
            Some(maps::decode(kind, &bytes, "the condition image").map_err(|e| bad(format!("{e:#}")))?)
        }
        (Some(_), None) => return Err(bad("cond: this model is not conditioned on pictures")),
        (None, Some(kind)) => {
            return Err(bad(format!("this model is conditioned on {}: give a condition image", kind.describe())))
        }
        (None, None) => None,
    };
    if picture.is_none() && m.stage.is_none() {
        m.class_tokens(r.class.as_deref()).map_err(|e| bad(format!("{e:#}").replace("--class ", "class ")))?;
    } else if r.class.is_some() {
        return Err(bad("class: this model is not class-conditional"));
    }
    Ok(SampleJob {
        model: r.model,
        grid,
        class: r.class,
        picture,
        pick: Pick { temperature: r.temperature, top_k: r.top_k, top_p: r.top_p, codes: m.vq.codes() },
        guidance,
        seed: r.seed,
        count: r.count,
    })
}

/// A queued job: its ticket, its cancel flag and its events.
struct Queued {
    ticket: u64,
    cancelled: Arc<AtomicBool>,
    events: mpsc::Receiver<Event>,
}

/// Queue `work` (503 once the server is stopping).
fn submit(state: &State, work: Work) -> Result<Queued, HttpError> {
    let (events, received) = mpsc::channel();
    let cancelled = Arc::new(AtomicBool::new(false));
    // Tickets and the inbox's order agree: both under one lock.
    let mut next = state.next_ticket.lock().unwrap();
    let inbox = state.inbox.lock().unwrap();
    let inbox = inbox.as_ref().ok_or_else(|| HttpError(503, "the server is stopping".into()))?;
    let ticket = *next;
    let job = Job { ticket, work, cancelled: cancelled.clone(), events };
    inbox.send(job).map_err(|_| HttpError(503, "the server is stopping".into()))?;
    *next += 1;
    Ok(Queued { ticket, cancelled, events: received })
}

/// Answer a checked sample request with a stream of server-sent events (chunked, so each event
/// reaches the page as it happens): `queue` (jobs ahead), `progress`, `done` or `error`.
fn stream_sample(state: &State, request: tiny_http::Request, job: SampleJob) {
    let Queued { ticket, cancelled, events } = match submit(state, Work::Sample(job)) {
        Ok(q) => q,
        Err(HttpError(status, msg)) => {
            let _ = respond_json(request, status, &json!({ "error": msg }));
            return;
        }
    };
    let mut out = request.into_writer();
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
                Transfer-Encoding: chunked\r\n\r\n";
    let mut alive = write!(out, "{head}").is_ok();
    let mut send = |event: &str, data: &Value| -> std::io::Result<()> {
        let text = format!("event: {event}\ndata: {data}\n\n");
        write!(out, "{:x}\r\n{text}\r\n", text.len())?;
        out.flush()
    };
    let ahead = || ticket.saturating_sub(state.finished.load(Ordering::SeqCst));
    alive = alive && send("queue", &json!({"ticket": ticket, "ahead": ahead()})).is_ok();
    while alive {
        match events.recv_timeout(Duration::from_millis(500)) {
            Ok(Event::Started) => alive = send("started", &json!({"ticket": ticket})).is_ok(),
            Ok(Event::Progress { done, total, preview }) => {
                alive = send("progress", &json!({"done": done, "total": total, "preview": preview})).is_ok()
            }
            Ok(Event::Sampled { png, width, height, order, seconds }) => {
                let data = json!({"png": data_url(&png), "width": width, "height": height, "ticket": ticket,
                                  "order": order, "seconds": seconds});
                let _ = send("done", &data);
                break;
            }
            Ok(Event::Failed(msg)) => {
                let _ = send("error", &json!({"error": msg}));
                break;
            }
            Ok(Event::Reconstructed { .. }) => break,
            // Still queued or running: the position (and a write that notices a closed page).
            Err(mpsc::RecvTimeoutError::Timeout) => {
                alive = send("queue", &json!({"ticket": ticket, "ahead": ahead()})).is_ok()
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if !alive {
        cancelled.store(true, Ordering::SeqCst);
        return;
    }
    let _ = write!(out, "0\r\n\r\n").and_then(|_| out.flush());
}

/// POST /api/reconstruct?model=N with an image as the body: input | reconstruction and its PSNR
/// (label maps: % of labels right).
fn reconstruct(state: &State, query: &str, body: &[u8]) -> Result<Value, HttpError> {
    let model = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("model="))
        .unwrap_or("0")
        .parse::<usize>()
        .map_err(|e| bad(format!("model: {e}")))?;
    let entry = state.entries.get(model).ok_or_else(|| HttpError(404, format!("no model {model}")))?;
    let vq = entry.model.vq();
    let kind = Kind::of(&vq.config).map_err(|e| bad(format!("{e:#}")))?;
    let picture = maps::decode(kind, body, "the uploaded image").map_err(|e| bad(format!("{e:#}")))?;
    let (w, h) = picture.dimensions();
    let max = state.opts.max_side as u32;
    // Larger images shrink to the server's limit (their short side to the training size).
    let size = (w.max(h) > max).then_some(vq.config.resolution as u32);
    let picture = picture
        .prepare(size, vq.config.factor() as u32, Path::new("the uploaded image"))
        .map_err(|e| bad(format!("{e:#}")))?;
    for event in submit(state, Work::Reconstruct { model, picture })?.events {
        match event {
            Event::Reconstructed { png, score, unit } => {
                return Ok(json!({"png": data_url(&png), "score": score, "unit": unit}));
            }
            Event::Failed(msg) => return Err(HttpError(500, msg)),
            _ => {}
        }
    }
    Err(HttpError(500, "the reconstruction stopped".into()))
}
