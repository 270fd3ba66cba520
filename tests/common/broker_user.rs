//! RabbitMQ users made for a test (`rabbitmqctl add_user`), deleted when dropped.

use std::process::Command;

use agent_connection_manager::client::Client;

/// A RabbitMQ user that exists for the test's lifetime.
pub struct BrokerUser {
    pub name: String,
    pub password: String,
}

impl BrokerUser {
    pub fn create(prefix: &str) -> Self {
        Self::with_permissions(prefix, [".*", ".*", ".*"])
    }

    pub fn with_permissions(prefix: &str, [configure, write, read]: [&str; 3]) -> Self {
        let name = format!("{prefix}-{}", super::random_suffix());
        let password = super::random_suffix();
        super::rabbitmqctl(&["add_user", &name, &password]);
        super::rabbitmqctl(&["set_permissions", "-p", "/", &name, configure, write, read]);
        Self { name, password }
    }

    pub fn topic_permissions(&self, exchange: &str, write: &str) {
        super::rabbitmqctl(&["set_topic_permissions", "-p", "/", &self.name, exchange, write, "^$"]);
    }

    pub fn url(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.name, self.password)
    }

    /// A client connected as this user, sending its name as every message's `user_id` (as the broker requires).
    pub async fn client(&self, prefix: &str) -> Client {
        Client::connect(&self.url(), prefix).await.expect("the user connects").with_user_id(&self.name)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        if let Some(ctl) = super::programs::find_program_in("rabbitmqctl", &super::programs::rabbitmqctl_dirs()) {
            let _ = Command::new(ctl).args(["delete_user", &self.name]).output();
        }
    }
}
