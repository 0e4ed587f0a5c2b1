//! Link the `cove` binary at a fixed address (not position-independent).
//!
//! `cove run` executes this binary for every sandbox, and a PIE of this
//! size spends most of its start-up applying ~37,000 relative relocations,
//! each a copy-on-write fault on a page of `.data.rel.ro`. A non-PIE
//! executable has them resolved by the linker, so the loader has nothing
//! to do. The crates are still compiled position-independent; only the
//! final link changes.
fn main() {
    println!("cargo::rustc-link-arg-bins=-no-pie");
}
