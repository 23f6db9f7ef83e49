//! Data-parallel training across processes on MPI (`--features mpi`; rsmpi over Open MPI, MPICH,
//! Slurm's PMI). Every rank runs the same training loop on its own adapter with the same seed, so
//! all ranks draw the same global batch; each computes the loss and gradients of its shard of it,
//! the gradients are averaged across ranks (one allreduce over all of them, a single bucket: our
//! tape finishes the backward pass before any gradient is read, so there is nothing to overlap
//! it with), and every rank applies the same optimizer step: the parameters stay identical. Rank 0
//! writes the checkpoints, logs and grids; a checkpoint does not depend on the number of ranks, so
//! `--resume` works with any. A rank that fails aborts the job (`MPI_Abort`): the others stop
//! instead of waiting in a collective, and the last checkpoint is intact (written atomically).
//!
//! Without the feature, or outside `mpirun`/`srun`, the world is one process.

use std::ops::Range;

use anyhow::{bail, Result};

use super::tensor::Tensor;

/// Part `index` of `count` of a job's inputs (`--shard i/n`, or the rank under mpirun/srun):
/// for `encode` and `sample` over large sets, each part written to its own file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// "i/n", 0 <= i < n.
    pub fn parse(s: &str) -> Result<Shard> {
        let bad = || anyhow::anyhow!("--shard '{s}': expected i/n with 0 <= i < n (e.g. 0/4)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) =
            (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// The shard given, else this process's rank when a launcher started several, else none.
    pub fn or_rank(given: Option<Shard>) -> Option<Shard> {
        given.or_else(|| {
            let count = launched_size().filter(|&n| n > 1)?;
            let index = ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"]
                .iter()
                .find_map(|k| std::env::var(k).ok()?.parse().ok())?;
            (index < count).then_some(Shard { index, count })
        })
    }

    /// This shard's consecutive share of `len` items.
    pub fn range(&self, len: usize) -> Range<usize> {
        self.index * len / self.count..(self.index + 1) * len / self.count
    }

    /// `path` with `.shard-i-of-n` before its extension (each shard writes its own file).
    pub fn file(&self, path: &std::path::Path) -> std::path::PathBuf {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let name = match path.extension() {
            Some(ext) => format!("{stem}.shard-{}-of-{}.{}", self.index, self.count, ext.to_string_lossy()),
            None => format!("{stem}.shard-{}-of-{}", self.index, self.count),
        };
        path.with_file_name(name)
    }
}

/// What the collectives exchange: f32 and u32 (MPI types them).
#[cfg(feature = "mpi")]
pub trait Element: mpi::traits::Equivalence + Copy + Default {}
#[cfg(not(feature = "mpi"))]
pub trait Element: Copy + Default {}
impl Element for f32 {}
impl Element for u32 {}

/// The processes of a run: this one's rank and how many there are.
pub struct World {
    rank: usize,
    size: usize,
    #[cfg(feature = "mpi")]
    mpi: Option<Mpi>,
}

#[cfg(feature = "mpi")]
struct Mpi {
    // Dropped last: MPI_Finalize.
    comm: mpi::topology::SimpleCommunicator,
    _universe: mpi::environment::Universe,
}

/// How many processes the launcher (mpirun, srun) started, from its environment (None: not
/// launched by one).
pub fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
}

/// This process's index among the ranks on its machine, when a launcher started several.
pub fn local_rank() -> Option<usize> {
    if launched_size().unwrap_or(1) < 2 {
        return None;
    }
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
}

impl World {
    /// One process.
    pub fn single() -> World {
        World {
            rank: 0,
            size: 1,
            #[cfg(feature = "mpi")]
            mpi: None,
        }
    }

    /// MPI's world when launched by mpirun/srun (and built with the feature), else one process.
    /// Call once per process; the world ends (MPI_Finalize) when it is dropped.
    pub fn init() -> Result<World> {
        let launched = launched_size().unwrap_or(1);
        #[cfg(feature = "mpi")]
        if launched > 1 || std::env::var_os("OMPI_COMM_WORLD_RANK").is_some() {
            use mpi::traits::Communicator;
            let Some(universe) = mpi::initialize() else { bail!("MPI was initialised twice in this process") };
            let comm = universe.world();
            let (rank, size) = (comm.rank() as usize, comm.size() as usize);
            return Ok(World { rank, size, mpi: Some(Mpi { comm, _universe: universe }) });
        }
        if launched > 1 {
            bail!(
                "launched as {launched} processes (mpirun/srun), but this taming was built without MPI: each would \
                 train alone and write the same files. Build it with `cargo build --release --features mpi`"
            );
        }
        Ok(World::single())
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The rank that writes files.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Wait for every rank.
    pub fn barrier(&self) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::CommunicatorCollectives;
            m.comm.barrier();
        }
    }

    /// Sum `values` across ranks, in place (every rank gets the sums).
    pub fn sum_in_place(&self, values: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let send = values.to_vec();
            m.comm.all_reduce_into(&send[..], values, SystemOperation::sum());
        }
        let _ = values;
    }

    /// Every rank's `values` end to end, in rank order (each rank gives as many).
    pub fn all_gather<T: Element>(&self, values: &[T]) -> Vec<T> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::CommunicatorCollectives;
            let mut out = vec![T::default(); values.len() * self.size];
            m.comm.all_gather_into(values, &mut out[..]);
            return out;
        }
        values.to_vec()
    }

    /// Stop every rank of the job (after a failure on this one), exit status `code`.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::traits::Communicator;
            m.comm.abort(code);
        }
        std::process::exit(code)
    }

    /// This rank's rows of a global batch of `batch`: the ranks take equal consecutive shares.
    pub fn shard(&self, batch: usize) -> Result<Range<usize>> {
        if !batch.is_multiple_of(self.size) {
            bail!("batch {batch} does not split evenly over {} ranks: choose a multiple of {}", self.size, self.size);
        }
        let per = batch / self.size;
        Ok(self.rank * per..(self.rank + 1) * per)
    }

    /// The mean of `value` across ranks.
    pub fn mean(&self, value: f32) -> f32 {
        let mut v = [value];
        self.sum_in_place(&mut v);
        v[0] / self.size as f32
    }

    /// Replace every gradient by its mean across ranks: one allreduce of all of them end to end.
    pub fn average_gradients(&self, grads: &mut [Tensor]) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        let mut flat = Vec::with_capacity(grads.iter().map(|g| g.numel()).sum());
        for g in grads.iter() {
            flat.extend(g.to_vec()?);
        }
        self.sum_in_place(&mut flat);
        let scale = 1.0 / self.size as f32;
        flat.iter_mut().for_each(|v| *v *= scale);
        let mut at = 0;
        for g in grads.iter_mut() {
            let n = g.numel();
            *g = Tensor::from_f32(&g.gpu, &flat[at..at + n], g.shape())?;
            at += n;
        }
        Ok(())
    }

    /// Run `f` on rank 0 first while the others wait, then on the others (after rank 0 wrote
    /// the caches they read: tokenized codes, the run folder).
    pub fn root_first<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.is_root() {
            let out = f();
            self.barrier();
            out
        } else {
            self.barrier();
            f()
        }
    }

    /// After `result` of this rank's training: a failure on one of several ranks stops all of
    /// them (the error printed first, rank-tagged), so none waits forever in a collective.
    pub fn finish<T>(&self, result: Result<T>) -> Result<T> {
        if let (Err(e), true) = (&result, self.size > 1) {
            eprintln!("error (rank {} of {}): {e:#}", self.rank, self.size);
            self.abort(1);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_inputs_and_name_their_files() {
        let s = Shard::parse("1/3").unwrap();
        assert_eq!((s.range(10), Shard::parse("2/3").unwrap().range(10)), (3..6, 6..10));
        assert_eq!(
            s.file(std::path::Path::new("out/codes.npy")),
            std::path::PathBuf::from("out/codes.shard-1-of-3.npy")
        );
        for bad in ["3/3", "1", "a/2", "0/0", "-1/2"] {
            assert!(Shard::parse(bad).unwrap_err().to_string().contains("--shard"), "{bad}");
        }
    }

    #[test]
    fn one_process_shards_and_sums_trivially() {
        let w = World::single();
        assert_eq!(w.shard(8).unwrap(), 0..8);
        let mut v = [1.0, 2.0];
        w.sum_in_place(&mut v);
        assert_eq!(v, [1.0, 2.0]);
        assert_eq!(w.mean(3.0), 3.0);
        let w4 = World {
            rank: 2,
            size: 4,
            #[cfg(feature = "mpi")]
            mpi: None,
        };
        assert_eq!(w4.shard(8).unwrap(), 4..6);
        assert!(w4.shard(6).unwrap_err().to_string().contains("multiple of 4"));
    }
}
