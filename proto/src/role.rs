//! What a worker does in a run: train (leases and meta-gradients) or evaluate
//! (validation jobs); sent at registration as `RegisterRequest.role`, shown in status.

/// A worker's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Role {
    /// Leases instances and submits meta-gradients.
    #[default]
    Trainer,
    /// Takes validation jobs: runs φ and a tuned baseline on held-out instances.
    Evaluator,
}

impl Role {
    /// The name on the wire and in status.
    pub fn name(self) -> &'static str {
        match self {
            Role::Trainer => "trainer",
            Role::Evaluator => "evaluator",
        }
    }

    /// The role a registration names; empty (older workers) is a trainer, and a name
    /// this coordinator does not know is none.
    pub fn from_wire(s: &str) -> Option<Role> {
        match s {
            "" | "trainer" => Some(Role::Trainer),
            "evaluator" => Some(Role::Evaluator),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
