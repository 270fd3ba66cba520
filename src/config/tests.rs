//! The configuration's unit tests: defaults, layering, validation, redaction.

use super::*;

fn from_toml(s: &str) -> Result<Settings, ConfigError> {
    Settings::from_figment(Figment::from(Serialized::defaults(Settings::default())).merge(Toml::string(s)))
}

#[test]
fn defaults_are_valid_and_as_documented() {
    let s = Settings::default();
    s.validate().unwrap();
    s.validate_worker().unwrap();
    assert_eq!(s.database.pool_size.get(), 20);
    assert_eq!(s.amqp.prefix, "agent");
    assert_eq!(s.amqp.prefetch.get(), 2000);
    assert_eq!(s.amqp.command_queue_type, QueueType::Quorum);
    assert_eq!(s.sweeper.check_interval_secs.get(), 30);
    assert_eq!(s.sweeper.connection_stale_after_secs.get(), 120);
    assert_eq!(s.sweeper.session_inactive_after_secs.get(), 3600);
    assert_eq!(s.http.listen, "");
    assert_eq!(s.amqp.max_message_bytes.get(), 1_048_576);
    assert_eq!(s.amqp.confirm_timeout_secs.get(), 10);
    assert_eq!(s.outbox.lease_secs, 3);
    assert_eq!(s.database.statement_timeout_secs.get(), 30);
    assert_eq!(s.database.lock_timeout_secs.get(), 10);
    assert_eq!(s.database.idle_in_transaction_timeout_secs.get(), 60);
    assert_eq!(s.worker.shutdown_grace_secs.get(), 20);
}

#[test]
fn every_wait_is_bounded() {
    for (section, key) in [
        ("amqp", "confirm_timeout_secs"),
        ("database", "statement_timeout_secs"),
        ("database", "lock_timeout_secs"),
        ("database", "idle_in_transaction_timeout_secs"),
        ("worker", "shutdown_grace_secs"),
    ] {
        let e = from_toml(&format!("[{section}]\n{key} = 0")).unwrap_err().to_string();
        assert!(e.contains(&format!("{section}.{key}")), "{e}");
    }
    let e = from_toml("[outbox]\nlease_secs = 1").unwrap_err().to_string();
    assert!(e.contains("outbox.lease_secs") && e.contains("at least 2"), "{e}");
    from_toml("[outbox]\nlease_secs = 2").unwrap();
}

#[test]
fn the_repo_defaults_file_equals_the_built_in_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_FILE);
    let from_file: Settings = Figment::from(Toml::file(path)).extract().unwrap();
    assert_eq!(from_file, Settings::default());
}

#[test]
fn the_session_activity_granularity_must_be_below_the_inactivity_threshold() {
    let mut s = Settings::default();
    s.worker.session_activity_granularity_secs = s.sweeper.session_inactive_after_secs.get();
    let e = s.validate().unwrap_err().to_string();
    assert!(e.contains("worker.session_activity_granularity_secs:"), "{e}");
    s.worker.session_activity_granularity_secs = s.sweeper.session_inactive_after_secs.get() - 1;
    s.validate().unwrap();
}

#[test]
fn settings_that_cannot_work_together_are_refused_naming_the_keys() {
    let mut s = Settings::default();
    s.amqp.prefetch = 1000.try_into().unwrap();
    let e = s.validate_worker().unwrap_err().to_string();
    assert!(e.contains("amqp.prefetch:") && e.contains("worker.heartbeat_pipeline"), "{e}");
    let mut s = Settings::default();
    s.database.pool_size = 18.try_into().unwrap();
    let e = s.validate_worker().unwrap_err().to_string();
    assert!(e.contains("database.pool_size:") && e.contains("19"), "{e}");
    assert!(!e.contains('\n'));
    s.worker.command_lanes = 7.try_into().unwrap();
    s.validate_worker().unwrap();
}

#[test]
fn a_bad_value_names_its_key_on_one_line() {
    let e = from_toml("[database]\npool_size = \"many\"").unwrap_err().to_string();
    assert!(e.contains("database.pool_size"), "{e}");
    assert!(!e.contains('\n'));
    let e = from_toml("[amqp]\ncommand_queue_type = \"stream\"").unwrap_err().to_string();
    assert!(e.contains("amqp.command_queue_type"), "{e}");
    let e = from_toml("[sweeper]\nstale_brake_ratio = 1.5").unwrap_err().to_string();
    assert!(e.contains("sweeper.stale_brake_ratio"), "{e}");
    let e = from_toml("[amqp]\nurl = \"http://x\"").unwrap_err().to_string();
    assert!(e.contains("amqp.url"), "{e}");
    let e = from_toml("[amqp]\nnope = 1").unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}"); // What a type says (not zero) is refused by the type, naming the key too.
    for (section, key) in [
        ("amqp", "prefetch"),
        ("amqp", "max_message_bytes"),
        ("amqp", "command_delivery_limit"),
        ("worker", "heartbeat_batch_size"),
        ("worker", "heartbeat_pipeline"),
        ("worker", "command_lanes"),
        ("outbox", "pipeline"),
        ("sweeper", "parallel_batches"),
        ("sweeper", "check_interval_secs"),
        ("sweeper", "connection_stale_after_secs"),
        ("sweeper", "session_inactive_after_secs"),
        ("sweeper", "instruction_retry_window_secs"),
        ("instructions", "default_ttl_secs"),
        ("outbox", "poll_interval_ms"),
        ("database", "pool_size"),
        ("database", "checkout_timeout_secs"),
        ("database", "statement_timeout_secs"),
        ("database", "lock_timeout_secs"),
        ("database", "idle_in_transaction_timeout_secs"),
        ("amqp", "confirm_timeout_secs"),
        ("worker", "shutdown_grace_secs"),
        ("http", "stats_cache_secs"),
    ] {
        let e = from_toml(&format!("[{section}]\n{key} = 0")).unwrap_err().to_string();
        assert!(e.contains(&format!("{section}.{key}")) && e.contains("nonzero"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
}

#[test]
fn a_misspelled_key_or_section_of_a_file_names_the_closest_one() {
    let e = from_toml("[sweeper]\ncheck_intervl_secs = 5").unwrap_err().to_string();
    assert!(e.contains("unknown key `sweeper.check_intervl_secs`, did you mean `sweeper.check_interval_secs`?"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    let e = from_toml("[sweper]\ncheck_interval_secs = 5").unwrap_err().to_string();
    assert!(e.contains("unknown section `sweper`, did you mean `sweeper`?"), "{e}");
}

#[test]
#[allow(clippy::result_large_err)] // figment::Jail's closure type is figment's own
fn only_the_command_line_serves_http_unless_http_listen_is_set() {
    figment::Jail::expect_with(|jail| {
        // The jail's working directory has no config/default.toml.
        let library = Settings::load(None).map_err(|e| e.to_string())?;
        assert_eq!(library.http.listen, "");
        let command_line = Settings::load_command_line(None).map_err(|e| e.to_string())?;
        assert_eq!(command_line.http.listen, WORKER_HTTP_LISTEN);
        jail.set_env("ACM_HTTP__LISTEN", "127.0.0.1:19999");
        assert_eq!(Settings::load(None).map_err(|e| e.to_string())?.http.listen, "127.0.0.1:19999");
        jail.set_env("ACM_HTTP__LISTEN", "");
        assert_eq!(Settings::load_command_line(None).map_err(|e| e.to_string())?.http.listen, "");
        Ok(())
    });
}

#[test]
#[allow(clippy::result_large_err)] // figment::Jail's closure type is figment's own
fn a_misspelled_variable_stops_loading() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("ACM_SWEPER__CHECK_INTERVAL_SECS", "5");
        let e = Settings::load(None).unwrap_err().to_string();
        assert!(e.contains("did you mean ACM_SWEEPER__CHECK_INTERVAL_SECS?"), "{e}");
        Ok(())
    });
}

#[test]
#[allow(clippy::result_large_err)] // figment::Jail's closure type is figment's own
fn only_section_variables_are_keys() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("ACM_DATABASE__POOL_SIZE", "3");
        jail.set_env("ACM_TEST_PG_BASE", "postgres://elsewhere");
        jail.set_env("ACM_CONFIG", "/nonexistent-but-not-read-here.toml");
        let s = Settings::from_figment(Figment::from(Serialized::defaults(Settings::default())).merge(env_provider()))
            .map_err(|e| e.to_string())?;
        assert_eq!(s.database.pool_size.get(), 3);
        jail.set_env("ACM_DATABASE__POOL_SIZ", "3");
        let e = Settings::from_figment(Figment::from(Serialized::defaults(Settings::default())).merge(env_provider()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pool_siz"), "{e}");
        Ok(())
    });
}

#[test]
#[allow(clippy::result_large_err)] // figment::Jail's closure type is figment's own
fn every_section_is_configured_by_its_variables() {
    let value = toml::Value::try_from(Settings::default()).expect("settings serialize");
    let sections: Vec<&str> = value.as_table().expect("a table").keys().map(String::as_str).collect();
    let mut known: Vec<&str> = SECTIONS.to_vec();
    known.sort_unstable();
    let mut sections = sections.clone();
    sections.sort_unstable();
    assert_eq!(known, sections, "SECTIONS lists exactly the sections of Settings");
    figment::Jail::expect_with(|jail| {
        jail.set_env("ACM_LOGS__RETENTION_DAYS", "3");
        jail.set_env("ACM_TELEMETRY__OTLP_ENDPOINT", "http://collector:4318");
        let s = Settings::load(None).map_err(|e| e.to_string())?;
        assert_eq!(s.logs.retention_days, 3);
        assert_eq!(s.telemetry.otlp_endpoint, "http://collector:4318");
        Ok(())
    });
}

#[test]
#[allow(clippy::result_large_err)] // figment::Jail's closure type is figment's own
fn the_old_name_of_the_idempotency_retention_is_read_and_recorded() {
    let s = from_toml("[outbox]\nretention_secs = 600\n").unwrap();
    assert_eq!(s.sweeper.idempotency_retention_secs, 600);
    assert_eq!(s.renamed, vec![("outbox.retention_secs", "sweeper.idempotency_retention_secs")]);
    assert_eq!(s.outbox.retention_secs, None, "moved, not kept");
    let printed = s.to_redacted_toml();
    assert!(!printed.lines().any(|l| l.starts_with("retention_secs")), "the old name is never printed:\n{printed}");
    let both = from_toml("[outbox]\nretention_secs = 600\n[sweeper]\nidempotency_retention_secs = 60\n");
    let e = both.unwrap_err().to_string();
    assert!(e.contains("outbox.retention_secs") && e.contains("set only sweeper.idempotency_retention_secs"), "{e}");
    let same = from_toml("[outbox]\nretention_secs = 60\n[sweeper]\nidempotency_retention_secs = 60\n").unwrap();
    assert_eq!(same.sweeper.idempotency_retention_secs, 60);
    assert!(Settings::default().renamed.is_empty());
    figment::Jail::expect_with(|jail| {
        jail.set_env("ACM_OUTBOX__RETENTION_SECS", "120");
        let s = Settings::load(None).map_err(|e| e.to_string())?;
        assert_eq!(s.sweeper.idempotency_retention_secs, 120);
        assert_eq!(s.renamed.len(), 1);
        Ok(())
    });
}

#[test]
fn redaction_hides_the_password_of_every_broker_node() {
    let mut s = Settings::default();
    s.amqp.url = "amqp://u:secret-one@a:5672/%2f, amqp://u:secret-two@b:5672/%2f".into();
    s.validate().unwrap();
    let toml = s.to_redacted_toml();
    assert!(!toml.contains("secret-one") && !toml.contains("secret-two"), "{toml}");
    assert!(toml.contains("amqp://u:***@a:5672/%2f,amqp://u:***@b:5672/%2f"), "{toml}");
}

#[test]
fn redaction_hides_passwords() {
    assert_eq!(redact_url("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
    assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    assert_eq!(redact_url("host=h user=u password=secret"), "host=h user=u password=***");
    assert_eq!(
        redact_url("postgres://acm:hunter2@h1:5432,h2:5433/acm?target_session_attrs=read-write"),
        "postgres://acm:***@h1:5432,h2:5433/acm?target_session_attrs=read-write"
    );
    assert_eq!(
        redact_url("postgres://acm@h1,h2/acm?password=hunter2&sslmode=require"),
        "postgres://acm@h1,h2/acm?password=***&sslmode=require"
    );
    assert_eq!(redact_url("host=h1,h2 port=5432,5433 password=hunter2"), "host=h1,h2 port=5432,5433 password=***");
    let mut s = Settings::default();
    s.database.url = "postgres://acm:hunter2@db/acm".into();
    assert!(!s.to_redacted_toml().contains("hunter2"));
    s.database.url = "postgres://acm:hunter2@h1:5432,h2:5433/acm?target_session_attrs=read-write".into();
    s.validate().unwrap();
    assert!(!s.to_redacted_toml().contains("hunter2"), "{}", s.to_redacted_toml());
    assert!(!s.to_redacted_toml().contains("guest:guest"));
}
