//! Which CPUs the fault loop and the vCPU threads run on.
//!
//! The fault loop busy-polls after faults only when a CPU is left for it beside one per
//! vCPU (`fault::handler`). Then it also gets that CPU to itself, and the vCPU threads
//! the others: left to the scheduler, a woken vCPU thread sometimes settles on the
//! spinning loop's CPU and stays there, and every fault then runs the vCPU's part and
//! the loop's one after the other on one CPU. Measured with 1 vCPU at CPL3: about 48 µs
//! a page on two CPUs, 82-92 µs in the runs that settled on one. Only the CPUs the
//! process may use (its affinity, e.g. from `taskset`) are handed out; with no CPU to
//! spare nothing is pinned and the loop does not spin.

use serde_json::{json, Value};

/// The plan, made once from the process's CPUs and the vCPU count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The fault loop's own CPU, when there is one to spare.
    fault_cpu: Option<usize>,
    /// The vCPU threads' CPUs (all but the fault loop's); empty: left as they are.
    vcpu_cpus: Vec<usize>,
}

impl Placement {
    /// The plan for `vcpus` vCPUs on the CPUs the calling thread may use.
    pub fn plan(vcpus: usize) -> Self {
        // A CPU quota (cgroup) can be lower than the affinity mask; both must leave one.
        let quota = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::plan_on(&allowed_cpus(), quota, vcpus)
    }

    fn plan_on(allowed: &[usize], quota: usize, vcpus: usize) -> Self {
        match allowed.split_last() {
            Some((&last, rest)) if allowed.len() > vcpus && quota > vcpus => Placement {
                fault_cpu: Some(last),
                vcpu_cpus: rest.to_vec(),
            },
            _ => Placement {
                fault_cpu: None,
                vcpu_cpus: Vec::new(),
            },
        }
    }

    /// Called on the fault loop's thread: moves it to its CPU. True if the loop may
    /// spin (it has a CPU to itself).
    pub fn enter_fault_loop(&self) -> bool {
        self.fault_cpu.is_some_and(|c| pin_current(&[c]))
    }

    /// Called on a vCPU thread: keeps it off the fault loop's CPU.
    pub fn enter_vcpu(&self) {
        if !self.vcpu_cpus.is_empty() {
            // Failing leaves the thread where the scheduler puts it: slower, not wrong.
            let _ = pin_current(&self.vcpu_cpus);
        }
    }

    /// The report's `placement`.
    pub fn to_json(&self) -> Value {
        json!({
            "fault_loop_cpu": self.fault_cpu,
            "vcpu_cpus": (!self.vcpu_cpus.is_empty()).then_some(&self.vcpu_cpus),
        })
    }
}

/// The CPUs the calling thread may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this thread.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: i is below CPU_SETSIZE, the set's size in CPUs.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

/// Restricts the calling thread to `cpus`; true if it took.
fn pin_current(cpus: &[usize]) -> bool {
    // SAFETY: as in `allowed_cpus`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
        // SAFETY: c is below CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this thread.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_gets_a_cpu_only_when_one_is_left_beside_the_vcpus() {
        let p = Placement::plan_on(&[0, 1], 2, 1);
        assert_eq!(p.fault_cpu, Some(1));
        assert_eq!(p.vcpu_cpus, vec![0]);
        // As many vCPUs as CPUs, or a quota that leaves none: nothing pinned.
        assert_eq!(Placement::plan_on(&[0, 1], 2, 2).fault_cpu, None);
        assert_eq!(Placement::plan_on(&[0, 1, 2, 3], 1, 1).fault_cpu, None);
        assert!(Placement::plan_on(&[], 4, 1).vcpu_cpus.is_empty());
        // Only the CPUs the process was given (taskset -c 2,5,7).
        let p = Placement::plan_on(&[2, 5, 7], 3, 2);
        assert_eq!(p.fault_cpu, Some(7));
        assert_eq!(p.vcpu_cpus, vec![2, 5]);
    }
}
