//! Pusher apps: the `[[app]]` tables and the one app of the `pusher_*` settings, looked up
//! by key (a client's `/app/{key}`) or id (the HTTP API's `/apps/{id}`). Each app counts
//! its connections on this node against its own `max_connections`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::{AppConfig, Config};

/// One app, checked.
pub struct App {
    pub id: String,
    pub key: String,
    secret: String,
    /// `client-*` events on private and presence channels.
    pub client_events: bool,
    pub max_connections: usize,
    connections: AtomicUsize,
}

impl App {
    pub fn secret(&self) -> &[u8] {
        self.secret.as_bytes()
    }

    /// The topic of one of this app's channels (already valid).
    pub fn topic(&self, channel: &str) -> String {
        crate::topic::pusher_topic(&self.id, channel)
    }

    /// The topic of a signed-in user's channel, `#server-to-user-ID` (`user` already valid).
    pub fn user_topic(&self, user: &str) -> String {
        self.topic(&format!("{}{user}", crate::topic::PUSHER_USER_CHANNEL))
    }

    /// What every topic of this app starts with.
    pub fn topic_prefix(&self) -> String {
        crate::topic::pusher_topic(&self.id, "")
    }

    /// A connection's share of the app's `max_connections`; None when it is full.
    pub fn admit(self: &Arc<Self>) -> Option<AppSlot> {
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_connections).then_some(n + 1)
            })
            .ok()
            .map(|_| AppSlot(self.clone()))
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

/// A connection's share of its app: given back on drop.
pub struct AppSlot(pub Arc<App>);

impl Drop for AppSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
pub struct Apps {
    by_key: HashMap<String, Arc<App>>,
    by_id: HashMap<String, Arc<App>>,
}

/// App ids and keys: 1-64 bytes of `A-Z a-z 0-9 _ - .` (they sit in URLs and topic names).
fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl Apps {
    /// The `[[app]]` tables, then the app of the `pusher_*` settings; every problem
    /// refused with what to change.
    pub fn from_config(cfg: &Config) -> anyhow::Result<Apps> {
        let mut tables: Vec<AppConfig> = cfg.apps.clone();
        let flags = [&cfg.pusher_app_id, &cfg.pusher_key, &cfg.pusher_secret];
        let given = flags.iter().filter(|v| !v.is_empty()).count();
        anyhow::ensure!(
            given == 0 || given == 3,
            "pusher_app_id, pusher_key and pusher_secret go together: give all three or none"
        );
        if given == 3 {
            tables.push(AppConfig {
                id: cfg.pusher_app_id.clone(),
                key: cfg.pusher_key.clone(),
                secret: cfg.pusher_secret.clone(),
                enable_client_events: false,
                max_connections: None,
                webhooks: Vec::new(),
            });
        }
        let mut apps = Apps::default();
        for a in tables {
            anyhow::ensure!(
                is_valid_name(&a.id) && is_valid_name(&a.key),
                "[[app]] {:?}: id and key must be 1-64 bytes of A-Z a-z 0-9 _ - .",
                a.id
            );
            anyhow::ensure!(
                !a.secret.is_empty(),
                "[[app]] {:?}: secret must not be empty",
                a.id
            );
            anyhow::ensure!(
                a.max_connections != Some(0),
                "[[app]] {:?}: max_connections must be at least 1",
                a.id
            );
            let app = Arc::new(App {
                max_connections: a.max_connections.unwrap_or(cfg.max_connections),
                client_events: a.enable_client_events,
                connections: AtomicUsize::new(0),
                id: a.id,
                key: a.key,
                secret: a.secret,
            });
            anyhow::ensure!(
                !apps.by_id.contains_key(&app.id),
                "two Pusher apps have the id {:?}",
                app.id
            );
            anyhow::ensure!(
                !apps.by_key.contains_key(&app.key),
                "two Pusher apps have the key {:?}",
                app.key
            );
            apps.by_id.insert(app.id.clone(), app.clone());
            apps.by_key.insert(app.key.clone(), app);
        }
        Ok(apps)
    }

    pub fn by_key(&self, key: &str) -> Option<&Arc<App>> {
        self.by_key.get(key)
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<App>> {
        self.by_id.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<App>> {
        self.by_id.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(apps: Vec<AppConfig>) -> Config {
        Config {
            apps,
            ..Config::default()
        }
    }

    fn app(id: &str, key: &str) -> AppConfig {
        AppConfig {
            id: id.into(),
            key: key.into(),
            secret: "s".into(),
            max_connections: Some(1),
            ..AppConfig::default()
        }
    }

    #[test]
    fn apps_are_found_by_key_and_id_and_count_their_connections() {
        let apps = Apps::from_config(&cfg(vec![app("1", "k1"), app("2", "k2")])).unwrap();
        let a = apps.by_key("k2").unwrap();
        assert_eq!(a.id, "2");
        assert!(apps.by_id("1").is_some() && apps.by_key("1").is_none());
        let slot = a.admit().unwrap();
        assert!(a.admit().is_none(), "max_connections 1");
        drop(slot);
        assert!(a.admit().is_some());
    }

    #[test]
    fn bad_tables_are_refused() {
        assert!(Apps::from_config(&cfg(vec![app("1", "k"), app("2", "k")])).is_err());
        assert!(Apps::from_config(&cfg(vec![app("1", "k"), app("1", "j")])).is_err());
        assert!(Apps::from_config(&cfg(vec![app("a/b", "k")])).is_err());
        let mut c = cfg(vec![]);
        c.pusher_app_id = "1".into();
        assert!(Apps::from_config(&c).is_err(), "key and secret missing");
        c.pusher_key = "k".into();
        c.pusher_secret = "s".into();
        assert!(Apps::from_config(&c).unwrap().by_key("k").is_some());
    }
}
