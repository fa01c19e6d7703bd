//! Sparkplug B 3.0: the payload schema, the edge node's births, deaths, data and
//! sequence numbers, and its `bdSeq` kept across restarts.
//!
//! # Layout
//!
//! | file | owns |
//! |---|---|
//! | `payload.rs` | the `sparkplug_b.proto` messages as prost structs, the datatype numbers |
//! | `node.rs` | `EdgeNode`: topics, NBIRTH/NDEATH/DBIRTH/DDEATH/DDATA, `seq`, aliases, historical rows, NCMD/DCMD, host STATE |
//! | `bdseq.rs` | the `bdSeq` file beside the queue |
//!
//! Nothing here does network I/O or knows the field side: the agent maps points to
//! [`MetricSpec`]s and readings to [`Sample`]s, and the uplink calls the node through its
//! format hook. Only [`BdSeqFile`] touches a file.

mod bdseq;
mod node;
pub mod payload;

use std::path::PathBuf;

pub use bdseq::BdSeqFile;
pub use node::{
    host_online, Command, DeviceSpec, EdgeNode, MetricSpec, NodeConfig, Outgoing, Sample, BD_SEQ,
    NAMESPACE, QUALITY_GOOD, QUALITY_PROPERTY, QUALITY_UNKNOWN, REBIRTH, UNIT_PROPERTY,
};

/// What goes wrong in the Sparkplug layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not a Sparkplug payload: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("not a topic of this edge node: {0}")]
    Topic(String),
    #[error("device {device} has no metric {metric}")]
    UnknownMetric { device: String, metric: String },
    #[error("the Sparkplug bdSeq file {path}: {source}")]
    BdSeq {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
