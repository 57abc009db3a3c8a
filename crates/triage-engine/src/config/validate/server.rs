//! `[server]`: socket and listen address, API keys and the tasks they may
//! call, the tasks behind the OpenAI-compatible routes.

use indexmap::IndexMap;
use triage_cloud::SecretString;

use super::super::raw::RawServer;
use super::super::types::{KeyConfig, ServerConfig, Task};
use super::Validator;

impl Validator {
    pub(super) fn server(
        &mut self,
        raw: &RawServer,
        tasks: &IndexMap<String, Task>,
    ) -> ServerConfig {
        let mut keys = Vec::new();
        for (i, k) in raw.keys.iter().enumerate() {
            let kk = format!("server.keys[{i}]");
            for t in &k.tasks {
                if !tasks.contains_key(t) {
                    self.problem(
                        format!("{kk}.tasks"),
                        format!("unknown task `{t}`"),
                        "name a [tasks.NAME] table",
                    );
                }
            }
            let key = SecretString::from_env(&k.key_env);
            if key.is_none() {
                self.warnings.push(format!(
                    "{kk}.key_env: {} is not set; key `{}` cannot be used",
                    k.key_env, k.name
                ));
            }
            keys.push(KeyConfig {
                name: k.name.clone(),
                key_env: k.key_env.clone(),
                key,
                tasks: k.tasks.clone(),
                requests_per_minute: k.requests_per_minute,
                allow_overrides: k.allow_overrides,
                admin: k.admin,
            });
        }
        for (field, value) in [
            ("moderation_task", &raw.moderation_task),
            ("transcription_task", &raw.transcription_task),
            ("chat_task", &raw.chat_task),
        ] {
            if let Some(t) = value
                && !tasks.contains_key(t)
            {
                self.problem(
                    format!("server.{field}"),
                    format!("unknown task `{t}`"),
                    "name a [tasks.NAME] table",
                );
            }
        }
        for (field, value) in [
            ("header_read_timeout_s", raw.header_read_timeout_s),
            ("body_idle_timeout_s", raw.body_idle_timeout_s),
            ("request_timeout_s", raw.request_timeout_s),
            ("keep_alive_idle_s", raw.keep_alive_idle_s),
        ] {
            if let Some(v) = value
                && !(v.is_finite() && v > 0.0 && v <= 86_400.0)
            {
                self.problem(
                    format!("server.{field}"),
                    format!("{v} is not a number of seconds above 0"),
                    "give seconds between 0 and 86400, or leave it out for the default",
                );
            }
        }
        for (field, value) in [
            ("max_connections_tcp", raw.max_connections_tcp),
            ("max_connections_socket", raw.max_connections_socket),
        ] {
            if value == Some(0) {
                self.problem(
                    format!("server.{field}"),
                    "0 would refuse every connection",
                    "give at least 1 (default 1024)",
                );
            }
        }
        ServerConfig {
            edge: super::super::types::EdgeConfig {
                header_read_timeout_s: raw.header_read_timeout_s,
                body_idle_timeout_s: raw.body_idle_timeout_s,
                request_timeout_s: raw.request_timeout_s,
                keep_alive_idle_s: raw.keep_alive_idle_s,
                max_connections_tcp: raw.max_connections_tcp,
                max_connections_socket: raw.max_connections_socket,
            },
            socket: raw.socket.as_ref().map(|s| {
                if s.is_absolute() {
                    s.clone()
                } else {
                    self.base_dir.join(s)
                }
            }),
            listen: raw.listen.clone(),
            keys,
            moderation_task: raw.moderation_task.clone(),
            transcription_task: raw.transcription_task.clone(),
            chat_task: raw.chat_task.clone(),
            categories: raw.categories.clone(),
            max_audio_seconds: raw.max_audio_seconds,
            ui_edit: raw.ui.edit,
            ui_socket_edit: raw.ui.socket_edit.unwrap_or(true),
            max_upload_bytes: raw.max_upload_bytes,
        }
    }
}
