//! field (see ARCHITECTURE.md).
