//! (placeholder: filled in by the work that needs it)
