//! How every Redis backend (bus, presence, limits, node registry) connects: one place for timeouts and reconnects.

use std::time::Duration;

use fred::prelude::{
    Builder, ClientLike, Config, ConnectionConfig, Error, PerformanceConfig, ReconnectPolicy,
};

/// A builder for `url` that reconnects forever with backoff (100 ms doubling to 5 s) and fails
/// a command after five seconds instead of queueing it for as long as Redis is away.
pub fn builder(url: &str) -> Result<Builder, Error> {
    let config = Config::from_url(url)?;
    let mut builder = Builder::from_config(config);
    builder
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
        .set_performance_config(PerformanceConfig {
            default_command_timeout: Duration::from_secs(5),
            // Pub/sub messages go through a broadcast channel: a small one drops messages
            // when a burst outruns the reader.
            broadcast_channel_capacity: 1 << 16,
            ..PerformanceConfig::default()
        })
        .set_connection_config(ConnectionConfig {
            connection_timeout: Duration::from_secs(3),
            ..ConnectionConfig::default()
        });
    Ok(builder)
}

/// Connects a client, failing when Redis does not answer at start-up.
pub async fn connect(url: &str) -> Result<fred::prelude::Client, Error> {
    let client = builder(url)?.build()?;
    client.init().await?;
    Ok(client)
}
