//! The controller's configuration (see `shared::config` for how it is loaded).

use serde::Deserialize;

use confroute_shared::config::{ConfigError, Issues, LogConfig, RedisConfig, Validate};

/// Root of `confroute-controller`'s settings.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControllerConfig {
    /// Where Redis is.
    pub redis: RedisConfig,
    /// Log output.
    pub log: LogConfig,
}

impl Validate for ControllerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let mut issues = Issues::default();
        issues.extend(self.redis.validate());
        issues.extend(self.log.validate());
        issues.finish()
    }
}
