//! Simulated game for `crier demo` (placeholder).
pub fn spawn(_server: &crate::server::Server) {}
