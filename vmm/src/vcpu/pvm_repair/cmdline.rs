//! The kernel command line a Linux guest needs on kvm_pvm.

/// Parameters a Linux guest needs on kvm_pvm (measured with a Debian 6.1 kernel, HOST.md):
/// `noxsave` and `clearcpuid=cx16,ssse3` hide features whose instructions KVM's emulator
/// cannot run at CPL0; `cryptomgr.notests`, `init_on_alloc=0`, `nowatchdog` and
/// `no_timer_check` skip work and timing checks that an emulated kernel is far too slow for,
/// and `rcupdate.rcu_cpu_stall_timeout=300` gives RCU's stall detector the same allowance (its
/// 21 s default is about 20 ms of kernel work at the emulator's 1.5 M instructions/s, less
/// than one long initcall takes on a guest of several nodes whose pages move between them);
/// `pci=off` because spanvm has no PCI.
///
/// The rest keep Linux away from KVM paravirtual features that bypass the user-space APIC or
/// make KVM write per-CPU guest pages (DESIGN.md, "Hazards"), in case the guest sees them
/// although spanvm's CPUID hides them (HOST.md: on kvm_pvm the guest may see the host's
/// CPUID); their MSRs are refused in the MSR filter besides (`hypervisor::REFUSED_PV_MSRS`).
/// `no-kvmapf`: no async page faults (`MSR_KVM_ASYNC_PF_EN/INT/ACK`); `no-steal-acc`: no
/// steal-time accounting; `nopvspin`: no PV spinlocks (whose kick is a KVM hypercall). Linux
/// 6.1 has no parameter against steal-time registration, PV EOI, PV TLB flush, PV sched-yield
/// or PV send-IPI: only the CPUID keeps the guest from those.
pub const PVM_KERNEL_PARAMS: &str = "noxsave clearcpuid=cx16,ssse3 cryptomgr.notests pci=off \
                                     init_on_alloc=0 nowatchdog no_timer_check \
                                     rcupdate.rcu_cpu_stall_timeout=300 no-kvmapf \
                                     no-steal-acc nopvspin";

const CLEARCPUID: &str = "clearcpuid";

/// Splits a command line into parameters with their byte offsets, keeping double-quoted
/// values whole.
fn tokens_at(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() && !quoted {
            if let Some(s) = start.take() {
                out.push((s, &text[s..i]));
            }
            continue;
        }
        if c == '"' {
            quoted = !quoted;
        }
        start.get_or_insert(i);
    }
    if let Some(s) = start {
        out.push((s, &text[s..]));
    }
    out
}

/// The parameters of a command line.
fn tokens(text: &str) -> Vec<&str> {
    tokens_at(text).into_iter().map(|(_, t)| t).collect()
}

/// A parameter's name as the kernel compares it (`-` and `_` are the same).
fn name(param: &str) -> String {
    param
        .split('=')
        .next()
        .unwrap_or(param)
        .trim_matches('"')
        .replace('-', "_")
}

/// The kernel's parameters (before a `--`, after which arguments go to init) and the rest.
fn split_init_args(cmdline: &str) -> (Vec<&str>, Option<&str>) {
    let all = tokens_at(cmdline);
    match all.iter().position(|(_, t)| *t == "--") {
        Some(i) => {
            let after = all[i].0 + "--".len();
            let params = all[..i].iter().map(|(_, t)| *t).collect();
            (params, Some(cmdline[after..].trim()))
        }
        None => (all.into_iter().map(|(_, t)| t).collect(), None),
    }
}

/// The feature names listed by `clearcpuid=` parameters in `params`.
fn cleared_features<'a>(params: &[&'a str]) -> Vec<&'a str> {
    params
        .iter()
        .filter(|p| name(p) == CLEARCPUID)
        .filter_map(|p| p.split_once('='))
        .flat_map(|(_, list)| list.trim_matches('"').split(','))
        .filter(|f| !f.is_empty())
        .collect()
}

/// `cmdline` with [`PVM_KERNEL_PARAMS`] added: a parameter the user already gave keeps the
/// user's value, except `clearcpuid=`, whose lists are merged into one parameter (the kernel
/// reads only one). Arguments for init after `--` stay at the end.
pub fn add_pvm_kernel_params(cmdline: &str) -> String {
    let (user, init_args) = split_init_args(cmdline);
    let ours = tokens(PVM_KERNEL_PARAMS);
    let mut features: Vec<&str> = Vec::new();
    for f in cleared_features(&user)
        .into_iter()
        .chain(cleared_features(&ours))
    {
        if !features.contains(&f) {
            features.push(f);
        }
    }
    let mut out: Vec<String> = user
        .iter()
        .filter(|p| name(p) != CLEARCPUID)
        .map(|p| p.to_string())
        .collect();
    for p in ours {
        let n = name(p);
        if n != CLEARCPUID && !user.iter().any(|u| name(u) == n) {
            out.push(p.to_string());
        }
    }
    out.push(format!("{CLEARCPUID}={}", features.join(",")));
    let mut line = out.join(" ");
    if let Some(rest) = init_args {
        line.push_str(" --");
        if !rest.is_empty() {
            line.push(' ');
            line.push_str(rest);
        }
    }
    line
}

/// What in `cmdline` defeats the kvm_pvm repairs, one message per problem: turning SMAP off
/// (`nosmap`, `clearcpuid=smap`) removes the `clac` at the start of the page-fault entry
/// that the SYSCALL repair hooks, so user space could not make system calls.
pub fn pvm_cmdline_problems(cmdline: &str) -> Vec<String> {
    let (params, _) = split_init_args(cmdline);
    let mut problems = Vec::new();
    let consequence = "on kvm_pvm the SYSCALL repair needs the `clac` that SMAP puts at the \
                       start of the kernel's page-fault entry, so user space could not make \
                       system calls";
    if params.iter().any(|p| name(p) == "nosmap") {
        problems.push(format!("`nosmap` turns SMAP off; {consequence}"));
    }
    if cleared_features(&params)
        .iter()
        .any(|f| f.eq_ignore_ascii_case("smap"))
    {
        problems.push(format!("`clearcpuid=smap` hides SMAP; {consequence}"));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_every_parameter_to_an_empty_line() {
        assert_eq!(
            add_pvm_kernel_params(""),
            "noxsave cryptomgr.notests pci=off init_on_alloc=0 nowatchdog no_timer_check \
             rcupdate.rcu_cpu_stall_timeout=300 no-kvmapf no-steal-acc nopvspin \
             clearcpuid=cx16,ssse3"
        );
    }

    #[test]
    fn keeps_the_users_values_and_merges_clearcpuid() {
        let line = add_pvm_kernel_params(
            "console=ttyS0 init_on_alloc=1 clearcpuid=avx512f,cx16 pci=noacpi root=/dev/vda",
        );
        let params = tokens(&line);
        assert!(params.contains(&"init_on_alloc=1"), "{line}");
        assert!(!params.contains(&"init_on_alloc=0"), "{line}");
        assert!(params.contains(&"pci=noacpi"), "{line}");
        assert!(!params.contains(&"pci=off"), "{line}");
        assert!(params.contains(&"console=ttyS0"), "{line}");
        assert!(params.contains(&"root=/dev/vda"), "{line}");
        let cpuid: Vec<_> = params.iter().filter(|p| name(p) == CLEARCPUID).collect();
        assert_eq!(cpuid, [&"clearcpuid=avx512f,cx16,ssse3"], "{line}");
        for p in [
            "noxsave",
            "cryptomgr.notests",
            "nowatchdog",
            "no_timer_check",
            "no-kvmapf",
            "no-steal-acc",
            "nopvspin",
        ] {
            assert!(params.contains(&p), "{p} missing from {line}");
        }
    }

    #[test]
    fn dashes_and_underscores_name_the_same_parameter() {
        let line = add_pvm_kernel_params("no-timer-check init-on-alloc=1");
        assert!(!line.contains("no_timer_check"), "{line}");
        assert!(!line.contains("init_on_alloc=0"), "{line}");
    }

    #[test]
    fn init_arguments_stay_after_the_separator() {
        let line = add_pvm_kernel_params("console=ttyS0 -- single  pci=off");
        let (kernel, init) = line.split_once(" -- ").unwrap();
        assert_eq!(init, "single  pci=off");
        // pci=off after `--` is init's, not the kernel's: the kernel still gets its own.
        assert!(tokens(kernel).contains(&"pci=off"), "{line}");
        assert!(kernel.contains("noxsave"));
    }

    #[test]
    fn quoted_values_stay_whole() {
        let line = add_pvm_kernel_params(r#"dyndbg="file foo.c +p" quiet"#);
        assert!(
            line.starts_with(r#"dyndbg="file foo.c +p" quiet "#),
            "{line}"
        );
    }

    #[test]
    fn adding_twice_changes_nothing_more() {
        let once = add_pvm_kernel_params("console=ttyS0 clearcpuid=pku");
        assert_eq!(add_pvm_kernel_params(&once), once);
    }

    #[test]
    fn reports_what_turns_smap_off() {
        assert!(pvm_cmdline_problems(&add_pvm_kernel_params("console=ttyS0")).is_empty());
        let p = pvm_cmdline_problems("nosmap clearcpuid=cx16,SMAP");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].contains("nosmap") && p[0].contains("system calls"),
            "{p:?}"
        );
        assert!(p[1].contains("clearcpuid=smap"), "{p:?}");
        // After `--` it is an argument of init, not a kernel parameter.
        assert!(pvm_cmdline_problems("quiet -- nosmap").is_empty());
    }
}
