//! The tokio runtime the `lb-server` binary runs on, and whether each of its
//! worker threads gets a CPU of its own.
//!
//! A change is pushed to every subscriber in one burst from an idle runtime.
//! When a runtime has as many workers as its process has CPUs, Linux often
//! wakes the second worker on the CPU of the first (the waker's), and the
//! burst then runs on one CPU while the other idles (BENCHMARKS.md, "Pinned
//! workers", has the measurements). A worker pinned to its own CPU cannot be stacked. With
//! `--pin-workers auto` lb-server pins only when the process may run on
//! exactly as many CPUs as it has workers, as in a pod given whole CPUs by the
//! kubelet's static CPU manager, or a machine of its own. The default is
//! `off`: a pod with no CPU limit has as many workers as its node has CPUs
//! and may run on all of them, so `auto` would pin a worker to every CPU of
//! a shared node.

use std::{
    cell::Cell,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use clap::ValueEnum;
use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};

/// Whether each worker thread is pinned to a CPU of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum PinWorkers {
    /// Pin when the process may run on exactly as many CPUs as it has workers.
    Auto,
    /// Pin worker i to the i-th CPU the process may run on (round robin).
    On,
    /// Let the kernel place the workers.
    #[default]
    Off,
}

/// The CPU each worker gets, or `None` to leave them unpinned: `allowed`
/// are the CPUs the process may run on.
pub fn plan(mode: PinWorkers, workers: usize, allowed: &[usize]) -> Option<Vec<usize>> {
    match mode {
        PinWorkers::Off => None,
        _ if allowed.is_empty() || workers == 0 => None,
        PinWorkers::Auto if allowed.len() != workers => None,
        PinWorkers::Auto | PinWorkers::On => {
            Some((0..workers).map(|i| allowed[i % allowed.len()]).collect())
        }
    }
}

/// The CPUs this process may run on (its affinity mask), in order.
pub fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = sched_getaffinity(Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

/// How many workers tokio would start: `TOKIO_WORKER_THREADS`, or one per
/// CPU the process may use (its affinity mask and CPU quota).
pub fn worker_count() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

thread_local! {
    /// Whether this worker thread has taken its CPU yet.
    static PLACED: Cell<bool> = const { Cell::new(false) };
}

/// A multi-threaded runtime of `workers` workers, each pinned to its CPU in
/// `cpus` if given. A worker takes the next CPU the first time it parks;
/// only worker threads park. A thread inherits its creator's CPUs, so every
/// thread the runtime starts (the blocking pool's too, which a pinned worker
/// may start) first takes back all the CPUs the process may use. Threads
/// others start from a worker (a library's) would stay on that worker's CPU:
/// start them from the main thread.
pub fn build(workers: usize, cpus: Option<Vec<usize>>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().worker_threads(workers);
    if let Some(cpus) = cpus {
        let all = sched_getaffinity(Pid::from_raw(0))?;
        builder.on_thread_start(move || {
            if let Err(error) = sched_setaffinity(Pid::from_raw(0), &all) {
                tracing::warn!(%error, "could not free a runtime thread to run on every CPU");
            }
        });
        let next = Arc::new(AtomicUsize::new(0));
        builder.on_thread_park(move || {
            if PLACED.replace(true) {
                return;
            }
            let Some(&cpu) = cpus.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return;
            };
            if let Err(error) = pin_current_thread(cpu) {
                tracing::warn!(cpu, %error, "could not pin a worker thread to its CPU");
            }
        });
    }
    builder.build()
}

fn pin_current_thread(cpu: usize) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_pins_only_when_every_worker_has_a_cpu_to_itself() {
        assert_eq!(plan(PinWorkers::Auto, 2, &[0, 1]), Some(vec![0, 1]));
        assert_eq!(plan(PinWorkers::Auto, 2, &[4, 7]), Some(vec![4, 7]));
        // A CPU quota below the mask (a pod limited on a bigger node).
        assert_eq!(plan(PinWorkers::Auto, 2, &[0, 1, 2, 3]), None);
        // More workers than CPUs (TOKIO_WORKER_THREADS).
        assert_eq!(plan(PinWorkers::Auto, 4, &[0, 1]), None);
        assert_eq!(plan(PinWorkers::Auto, 2, &[]), None);
    }

    #[test]
    fn on_pins_round_robin_and_off_never_pins() {
        assert_eq!(plan(PinWorkers::On, 3, &[2, 5]), Some(vec![2, 5, 2]));
        assert_eq!(plan(PinWorkers::On, 1, &[2, 5]), Some(vec![2]));
        assert_eq!(plan(PinWorkers::On, 2, &[]), None);
        assert_eq!(plan(PinWorkers::Off, 2, &[0, 1]), None);
    }

    /// The CPUs the calling thread may run on.
    fn cpus_of_this_thread() -> Vec<usize> {
        let set = sched_getaffinity(Pid::from_raw(0)).unwrap();
        (0..CpuSet::count())
            .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
            .collect()
    }

    #[test]
    fn a_pinned_worker_runs_on_its_cpu_and_the_threads_it_starts_on_every_cpu() {
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty());
        assert_eq!(cpus_of_this_thread(), allowed);
        let cpu = *allowed.last().unwrap();
        let runtime = build(1, Some(vec![cpu])).unwrap();
        let (worker, blocking) = runtime.block_on(async move {
            tokio::spawn(async move {
                // The one worker takes its CPU when it first parks, which it
                // does while its only task waits on a timer.
                for _ in 0..1_000 {
                    if cpus_of_this_thread() == [cpu] {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                let worker = cpus_of_this_thread();
                // A blocking-pool thread is started by the pinned worker.
                let blocking = tokio::task::spawn_blocking(cpus_of_this_thread)
                    .await
                    .unwrap();
                (worker, blocking)
            })
            .await
            .unwrap()
        });
        assert_eq!(worker, [cpu], "the worker is pinned");
        assert_eq!(blocking, allowed, "a thread it starts runs anywhere");
    }
}
