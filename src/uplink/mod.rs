//! uplink (see ARCHITECTURE.md).
