//! A pool of storage buffers keyed by size class, so the many short-lived
//! tensors of a forward/backward pass reuse allocations, and a pool of the textures the kernels read
//! through (matmul operands, flat copies), reused by size; both count toward peak memory.
//!
//! Reuse is what bounds memory: a buffer given back to wgpu is only freed once the work recorded
//! with it is done, and recording runs far ahead of a software device, so a pool that dropped
//! buffers freely would hold more, not less (measured: capping the caches at 128–256 MiB took a
//! 512² forward from 1.4 to 2.5–3.7 GB resident). Large entries are given back only together with
//! a wait for the device (`Gpu::make_room`).

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{bail, Result};

pub struct BufferPool {
    device: wgpu::Device,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    free_bytes: u64,
    live_bytes: u64,
    peak_bytes: u64,
}

/// Cached-but-unused bytes kept for reuse before the pool starts dropping buffers.
const MAX_FREE_BYTES: u64 = 2 << 30;

/// Buffers and textures from this size on are cached only until a large allocation misses the
/// caches: then the cached large ones are given back first (`Gpu::make_room`), so a megapixel
/// image's few huge activations are not held twice, once live and once cached in another size.
/// The many smaller tensors of a training step stay cached.
pub const LARGE: u64 = 32 << 20;

/// Bytes of smaller cached buffers (and, apart, textures) kept when large ones are given back:
/// megapixel images leave many sizes behind. (512², `bench vqgan`: 1.37 → 1.15–1.19 GB resident
/// with this and glibc's mmap threshold, `device::return_freed_memory_to_the_system`.)
const SMALL_KEPT: u64 = 128 << 20;

/// Size classes: 256-byte steps up to 4 KiB, then 1/16 of the enclosing power of two
/// (at most ~6% wasted).
pub fn size_class(bytes: u64) -> u64 {
    let b = bytes.max(16);
    if b <= 4096 {
        return b.div_ceil(256) * 256;
    }
    let step = b.next_power_of_two() / 16;
    b.div_ceil(step) * step
}

impl BufferPool {
    pub fn new(device: wgpu::Device) -> Self {
        BufferPool { device, state: Mutex::new(PoolState::default()) }
    }

    /// A buffer of at least `bytes` (its size class); `make_room` runs before a large one is
    /// allocated anew.
    pub fn take(&self, bytes: u64, max_buffer: u64, make_room: impl FnOnce()) -> Result<wgpu::Buffer> {
        let class = size_class(bytes);
        if class > max_buffer {
            bail!("a tensor of {bytes} bytes exceeds this device's largest buffer ({max_buffer} bytes)");
        }
        {
            let mut s = self.state.lock().unwrap();
            if let Some(buf) = s.free.get_mut(&class).and_then(|v| v.pop()) {
                s.free_bytes -= class;
                s.live_bytes += class;
                s.peak_bytes = s.peak_bytes.max(s.live_bytes);
                return Ok(buf);
            }
        }
        if class >= LARGE {
            // A cached large buffer of up to twice the size serves as well (tensors bind their
            // own length), rather than new memory.
            let mut s = self.state.lock().unwrap();
            let fit =
                s.free.iter().filter(|(&c, v)| c > class && c <= 2 * class && !v.is_empty()).map(|(&c, _)| c).min();
            if let Some(c) = fit {
                let buf = s.free.get_mut(&c).and_then(|v| v.pop()).expect("a non-empty class");
                s.free_bytes -= c;
                s.live_bytes += c;
                s.peak_bytes = s.peak_bytes.max(s.live_bytes);
                return Ok(buf);
            }
            drop(s);
            make_room();
        }
        let buf = match self.allocate(class) {
            Ok(b) => b,
            Err(_) => {
                // Give cached buffers back to the driver and try once more.
                self.trim(0);
                self.allocate(class)
                    .map_err(|e| anyhow::anyhow!("GPU out of memory allocating a tensor of {bytes} bytes: {e}"))?
            }
        };
        let mut s = self.state.lock().unwrap();
        s.live_bytes += class;
        s.peak_bytes = s.peak_bytes.max(s.live_bytes);
        Ok(buf)
    }

    fn allocate(&self, class: u64) -> Result<wgpu::Buffer> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: class,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            bail!("{e}");
        }
        Ok(buf)
    }

    pub fn give_back(&self, buf: wgpu::Buffer) {
        let class = buf.size();
        let mut s = self.state.lock().unwrap();
        s.live_bytes = s.live_bytes.saturating_sub(class);
        if s.free_bytes + class <= MAX_FREE_BYTES {
            s.free_bytes += class;
            s.free.entry(class).or_default().push(buf);
        }
    }

    /// Drop the cached buffers of `LARGE` bytes or more, and smaller ones beyond `SMALL_KEPT`
    /// bytes (largest first); returns how many bytes.
    pub fn release_large(&self) -> u64 {
        let mut s = self.state.lock().unwrap();
        let large: Vec<u64> = s.free.keys().copied().filter(|&c| c >= LARGE).collect();
        let mut released = 0;
        for c in large {
            if let Some(v) = s.free.remove(&c) {
                released += c * v.len() as u64;
            }
        }
        s.free_bytes -= released;
        {
            let keep = SMALL_KEPT;
            let before = s.free_bytes;
            let mut classes: Vec<u64> = s.free.keys().copied().collect();
            classes.sort_unstable_by(|a, b| b.cmp(a));
            for c in classes {
                while s.free_bytes > keep {
                    match s.free.get_mut(&c).and_then(|v| v.pop()) {
                        Some(_) => s.free_bytes -= c,
                        None => break,
                    }
                }
            }
            released += before - s.free_bytes;
        }
        released
    }

    /// Drop cached buffers until at most `keep` bytes stay cached.
    pub fn trim(&self, keep: u64) {
        let mut s = self.state.lock().unwrap();
        let classes: Vec<u64> = s.free.keys().copied().collect();
        for c in classes {
            while s.free_bytes > keep {
                match s.free.get_mut(&c).and_then(|v| v.pop()) {
                    Some(_) => s.free_bytes -= c,
                    None => break,
                }
            }
        }
    }

    /// Count bytes held outside the buffer classes (operand textures).
    pub fn account(&self, delta: i64) {
        let mut s = self.state.lock().unwrap();
        s.live_bytes = (s.live_bytes as i64 + delta).max(0) as u64;
        s.peak_bytes = s.peak_bytes.max(s.live_bytes);
    }

    /// Bytes held by live tensors now, and the most held at once since the last reset.
    pub fn usage(&self) -> (u64, u64) {
        let s = self.state.lock().unwrap();
        (s.live_bytes, s.peak_bytes)
    }

    pub fn reset_peak(&self) {
        let mut s = self.state.lock().unwrap();
        s.peak_bytes = s.live_bytes;
    }
}

/// (width, height, layers, format) of a pooled texture.
type TextureKey = (u32, u32, u32, wgpu::TextureFormat);

/// Operand textures of the matmul (rgba32float arrays), reused by size.
pub struct TexturePool {
    device: wgpu::Device,
    /// Where texture bytes are counted with the buffers' (peak memory).
    buffers: std::sync::Arc<BufferPool>,
    free: Mutex<HashMap<TextureKey, Vec<wgpu::Texture>>>,
    /// Layers every texture has at least. wgpu's GL backend makes a texture
    /// of one layer a GL_TEXTURE_2D, which a 2-D array view (all our kernels
    /// bind arrays) then reads as zeros (wgpu issues 1574, 1614): 2 there.
    min_layers: u32,
}

/// A pooled texture with a view of all its layers; back to the pool on drop.
pub struct PooledTexture {
    texture: Option<wgpu::Texture>,
    pub view: wgpu::TextureView,
    pool: std::sync::Arc<TexturePool>,
}

fn texture_bytes(t: &wgpu::Texture) -> i64 {
    let texel = match t.format() {
        wgpu::TextureFormat::R32Float => 4,
        _ => 16,
    };
    (t.width() as i64) * (t.height() as i64) * (t.depth_or_array_layers() as i64) * texel
}

impl PooledTexture {
    pub fn texture(&self) -> &wgpu::Texture {
        self.texture.as_ref().expect("a pooled texture's texture is only taken when it is dropped")
    }
}

impl Drop for PooledTexture {
    fn drop(&mut self) {
        if let Some(t) = self.texture.take() {
            self.pool.buffers.account(-texture_bytes(&t));
            let key = (t.width(), t.height(), t.depth_or_array_layers(), t.format());
            self.pool.free.lock().unwrap().entry(key).or_default().push(t);
        }
    }
}

impl TexturePool {
    pub fn new(device: wgpu::Device, buffers: std::sync::Arc<BufferPool>, backend: wgpu::Backend) -> Self {
        let min_layers = if backend == wgpu::Backend::Gl { 2 } else { 1 };
        TexturePool { device, buffers, free: Mutex::new(HashMap::new()), min_layers }
    }

    /// Drop the cached textures of `LARGE` bytes or more, and smaller ones beyond `SMALL_KEPT`
    /// bytes; returns how many bytes.
    pub fn release_large(&self) -> u64 {
        let mut released = 0;
        let mut free = self.free.lock().unwrap();
        let keep = Some(SMALL_KEPT as i64);
        let mut kept = 0i64;
        free.retain(|_, v| {
            v.retain(|t| {
                let b = texture_bytes(t);
                let drop_it = b >= LARGE as i64 || keep.is_some_and(|k| kept + b > k);
                if drop_it {
                    released += b as u64;
                } else {
                    kept += b;
                }
                !drop_it
            });
            !v.is_empty()
        });
        released
    }

    /// A texture of the given size and format (`make_room` runs before a large one is created
    /// anew).
    pub fn take_format(
        self: &std::sync::Arc<Self>,
        width: u32,
        height: u32,
        layers: u32,
        format: wgpu::TextureFormat,
        make_room: impl FnOnce(),
    ) -> Result<PooledTexture> {
        let layers = layers.max(self.min_layers);
        let reused = self.free.lock().unwrap().get_mut(&(width, height, layers, format)).and_then(|v| v.pop());
        let texture = match reused {
            Some(t) => t,
            None => {
                let texel = if format == wgpu::TextureFormat::R32Float { 4 } else { 16 };
                if width as u64 * height as u64 * layers as u64 * texel >= LARGE {
                    make_room();
                }
                let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
                let t = self.device.create_texture(&wgpu::TextureDescriptor {
                    label: Some("matmul operand"),
                    size: wgpu::Extent3d { width, height, depth_or_array_layers: layers },
                    mip_level_count: 1,
                    sample_count: 1,
                    dimension: wgpu::TextureDimension::D2,
                    format,
                    usage: wgpu::TextureUsages::TEXTURE_BINDING
                        | wgpu::TextureUsages::STORAGE_BINDING
                        | wgpu::TextureUsages::COPY_DST,
                    view_formats: &[],
                });
                if let Some(e) = pollster::block_on(scope.pop()) {
                    bail!("GPU out of memory allocating a {width}x{height}x{layers} operand texture: {e}");
                }
                t
            }
        };
        self.buffers.account(texture_bytes(&texture));
        let view = texture.create_view(&wgpu::TextureViewDescriptor {
            dimension: Some(wgpu::TextureViewDimension::D2Array),
            ..Default::default()
        });
        Ok(PooledTexture { texture: Some(texture), view, pool: self.clone() })
    }
}
