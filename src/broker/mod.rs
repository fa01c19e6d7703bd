//! broker (see ARCHITECTURE.md).
