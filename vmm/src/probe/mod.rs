//! Probe guests: small programs of this project (`images/probes/`) that run on the virtual
//! hardware with no OS, mostly at CPL3 so that they run natively on every host. Tests and
//! benchmarks use them to check the platform, the DSM and forwarding.

/// Guest-physical addresses, selectors and ports shared by the loader and the probe sources.
pub mod layout;
pub mod loader;

mod images {
    include!(concat!(env!("OUT_DIR"), "/probe_images.rs"));
}

/// The built-in probe image named `name`.
pub fn image(name: &str) -> Option<&'static [u8]> {
    images::PROBE_IMAGES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, img)| *img)
}

/// Names of every built-in probe.
pub fn names() -> impl Iterator<Item = &'static str> {
    images::PROBE_IMAGES.iter().map(|(n, _)| *n)
}
