//! The operator's error type, with a stable label per kind for metrics.

use crate::resources::BuildError;

/// Anything a reconcile can fail with; each kind becomes a metric label.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[source] kube::Error),
    #[error("finalizer handling failed: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("could not build a child object: {0}")]
    Build(#[from] BuildError),
    #[error("object has no {0}")]
    MissingField(&'static str),
}

impl Error {
    /// A short, stable name for the error kind (a Prometheus label value).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
            Error::Build(_) => "build",
            Error::MissingField(_) => "missing_field",
        }
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_apply_errors_are_labelled_by_their_own_kind() {
        let inner = Error::MissingField("namespace");
        let wrapped = Error::Finalizer(Box::new(kube::runtime::finalizer::Error::ApplyFailed(
            inner,
        )));
        assert_eq!(wrapped.metric_label(), "missing_field");
        let unnamed = Error::Finalizer(Box::new(kube::runtime::finalizer::Error::UnnamedObject));
        assert_eq!(unnamed.metric_label(), "finalizer");
    }
}
