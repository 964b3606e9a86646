//! Confab operator: the `ChatCluster` CRD (`crd`), its reconciler (`controller`), pure child
//! builders (`resources`), drain arithmetic (`rollout`), the gateway's metrics page
//! (`exposition`), metrics (`metrics`) and errors (`error`).

pub mod controller;
pub mod crd;
pub mod error;
pub mod exposition;
pub mod metrics;
pub mod resources;
pub mod rollout;
pub mod sample;

pub use error::{Error, Result};
