//! Confab operator: the `ChatCluster` CRD (`crd`), its reconciler (`controller`), pure child
//! builders (`resources`), drain arithmetic and deletion-cost policy (`rollout`), the gateway
//! pods' live connections and deletion costs (`fleet`, reading pages with `exposition`),
//! metrics (`metrics`) and errors (`error`).

pub mod controller;
pub mod crd;
pub mod error;
pub mod exposition;
pub mod fleet;
pub mod metrics;
pub mod resources;
pub mod rollout;
pub mod sample;

pub use error::{Error, Result};
