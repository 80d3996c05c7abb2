//! Transports frame: they hand messages to the ingress and turn `Event`s back into bytes.
//! They never see the model.

pub mod ha;
#[cfg(feature = "http")]
pub mod http;
pub mod mqtt;
pub mod socket;
