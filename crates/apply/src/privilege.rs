//! What a source may do on the target that grants privilege there, as a pure decision.
//!
//! A replica is a plain tree on the target, written by a process running as root. Four parts
//! of an op can hand whoever later reaches that tree (a local user, a workload started on it
//! at failover, an export of it) more than the data itself:
//!
//! - **set-id** bits (`S_ISUID`, `S_ISGID`) in any mode: a set-uid file owned by root is root
//!   for whoever may run it;
//! - **owners**: a uid or gid other than root's (the owner the target gives what it creates), and
//!   POSIX ACLs (`system.*` attributes), which grant access to named users just as an owner does;
//!   a replica file owned by a local user of the target is that user's to change;
//! - **capabilities**: `security.*` attributes (file capabilities, LSM labels, IMA/EVM) and
//!   `trusted.*` ones (overlayfs and other root-only metadata); only `user.*` attributes are
//!   harmless;
//! - **devices**: character and block device nodes, which open the target's own devices.
//!
//! Each is allowed, stripped (the op is applied without that part) or refused (the op is
//! refused with a reason, through the ordinary refusal path: the rest of the stream goes on),
//! per source, by the target's configuration only. [`PrivilegePolicy::default`] is what every
//! target did before the policy existed: everything but devices is allowed, which a faithful
//! whole-system DR needs (the replica lives in a 0700 data directory, reachable by root only).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use doppel_proto::{Attrs, Op, Xattr};
use serde::{Deserialize, Serialize};

/// What to do with one privileged part of an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    /// Apply it as the source sent it.
    Allow,
    /// Apply the op without it.
    Strip,
    /// Refuse the whole op.
    Refuse,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rule::Allow => "allow",
            Rule::Strip => "strip",
            Rule::Refuse => "refuse",
        })
    }
}

/// A word that is not a [`Rule`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: use \"allow\", \"strip\" or \"refuse\"")]
pub struct UnknownRule(pub String);

impl FromStr for Rule {
    type Err = UnknownRule;

    fn from_str(s: &str) -> Result<Rule, UnknownRule> {
        match s {
            "allow" => Ok(Rule::Allow),
            "strip" => Ok(Rule::Strip),
            "refuse" => Ok(Rule::Refuse),
            _ => Err(UnknownRule(s.to_string())),
        }
    }
}

/// A privileged part of an op (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Privilege {
    /// Set-uid and set-gid bits.
    SetId,
    /// Owners other than root, and ACLs.
    Owners,
    /// `security.*` and `trusted.*` attributes.
    Capabilities,
    /// Character and block device nodes.
    Devices,
}

impl Privilege {
    /// Every privilege, in the order status shows them.
    pub const ALL: [Privilege; 4] =
        [Privilege::SetId, Privilege::Owners, Privilege::Capabilities, Privilege::Devices];

    /// The configuration key (and the word status uses).
    pub fn key(self) -> &'static str {
        match self {
            Privilege::SetId => "setid",
            Privilege::Owners => "owners",
            Privilege::Capabilities => "capabilities",
            Privilege::Devices => "devices",
        }
    }
}

impl fmt::Display for Privilege {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// The rule for each privilege, for one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivilegePolicy {
    /// Set-id bits.
    pub setid: Rule,
    /// Owners and ACLs.
    pub owners: Rule,
    /// Privileged attributes.
    pub capabilities: Rule,
    /// Device nodes.
    pub devices: Rule,
}

/// Everything allowed but device nodes, as before the policy existed: a faithful DR of a
/// whole system needs its owners, set-id bits and capabilities, while no DR needs device nodes
/// (`/dev` is made by the kernel) and one written by a source opens the target's own disks.
impl Default for PrivilegePolicy {
    fn default() -> PrivilegePolicy {
        PrivilegePolicy {
            setid: Rule::Allow,
            owners: Rule::Allow,
            capabilities: Rule::Allow,
            devices: Rule::Refuse,
        }
    }
}

/// What the policy makes of an op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'a> {
    /// Apply this op (the original, or a copy without the stripped parts, which are listed).
    Apply {
        /// The op to apply.
        op: Cow<'a, Op>,
        /// What was taken out of it (empty: nothing).
        stripped: Vec<Privilege>,
    },
    /// Refuse the op because of this privilege.
    Refuse {
        /// The privilege refused.
        privilege: Privilege,
        /// Why, in words (sent to the source).
        reason: String,
    },
}

/// Rules that do not make sense together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// See [`PrivilegePolicy::check`].
    #[error(
        "setid = \"allow\" with owners = \"{0}\" would make every set-uid file set-uid root; \
         set setid to \"strip\" or \"refuse\" too"
    )]
    SetIdWithoutOwners(Rule),
}

const SETID: u32 = libc::S_ISUID | libc::S_ISGID;

/// Whether `mode` (of any op) carries set-id bits.
fn has_setid(mode: u32) -> bool {
    mode & SETID != 0
}

/// Whether a device node is made by `mode` (a `Mknod`'s).
fn is_device(mode: u32) -> bool {
    matches!(mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK)
}

/// Which privilege an extended attribute's name needs, if any.
pub fn xattr_privilege(name: &[u8]) -> Option<Privilege> {
    if name.starts_with(b"security.") || name.starts_with(b"trusted.") {
        Some(Privilege::Capabilities)
    } else if name.starts_with(b"system.") {
        Some(Privilege::Owners)
    } else {
        None
    }
}

/// Whether an owner id grants anything: root's is what the target gives anyway.
fn privileged_id(id: Option<u32>) -> bool {
    id.is_some_and(|i| i != 0)
}

/// The privileges `op` uses, each once, in [`Privilege::ALL`] order.
pub fn privileges_of(op: &Op) -> Vec<Privilege> {
    let mut p = Vec::new();
    let mut add = |x: Privilege| {
        if !p.contains(&x) {
            p.push(x);
        }
    };
    match op {
        Op::Create { mode, .. } | Op::Mkdir { mode, .. } if has_setid(*mode) => add(Privilege::SetId),
        Op::Mknod { mode, .. } => {
            if has_setid(*mode) {
                add(Privilege::SetId);
            }
            if is_device(*mode) {
                add(Privilege::Devices);
            }
        }
        Op::SetAttr { attrs, .. } => {
            if attrs.mode.is_some_and(has_setid) {
                add(Privilege::SetId);
            }
            if privileged_id(attrs.uid) || privileged_id(attrs.gid) {
                add(Privilege::Owners);
            }
            for x in attrs.xattrs.iter().flatten() {
                if let Some(priv_) = xattr_privilege(&x.name) {
                    add(priv_);
                }
            }
        }
        _ => {}
    }
    p.sort();
    p
}

impl PrivilegePolicy {
    /// A policy with one rule for everything.
    pub fn all(rule: Rule) -> PrivilegePolicy {
        PrivilegePolicy { setid: rule, owners: rule, capabilities: rule, devices: rule }
    }

    /// The rule for `p`.
    pub fn rule(&self, p: Privilege) -> Rule {
        match p {
            Privilege::SetId => self.setid,
            Privilege::Owners => self.owners,
            Privilege::Capabilities => self.capabilities,
            Privilege::Devices => self.devices,
        }
    }

    /// Sets the rule for `p`.
    pub fn set(&mut self, p: Privilege, rule: Rule) {
        match p {
            Privilege::SetId => self.setid = rule,
            Privilege::Owners => self.owners = rule,
            Privilege::Capabilities => self.capabilities = rule,
            Privilege::Devices => self.devices = rule,
        }
    }

    /// Checks that the rules make sense together: with owners not allowed, every set-uid file
    /// stays owned by root, so allowing set-id bits would turn a tenant's set-uid file into a
    /// set-uid root one.
    pub fn check(&self) -> Result<(), PolicyError> {
        if self.owners != Rule::Allow && self.setid == Rule::Allow {
            return Err(PolicyError::SetIdWithoutOwners(self.owners));
        }
        Ok(())
    }

    /// What to do with `op`: a refusal wins over stripping (the first privilege refused is
    /// named); otherwise every privilege to strip is taken out of a copy.
    pub fn decide<'a>(&self, op: &'a Op) -> Decision<'a> {
        let used = privileges_of(op);
        if let Some(&p) = used.iter().find(|&&p| self.rule(p) == Rule::Refuse) {
            return Decision::Refuse { privilege: p, reason: refusal(op, p) };
        }
        let stripped: Vec<Privilege> = used.into_iter().filter(|&p| self.rule(p) == Rule::Strip).collect();
        if stripped.is_empty() {
            return Decision::Apply { op: Cow::Borrowed(op), stripped };
        }
        Decision::Apply { op: Cow::Owned(strip(op, &stripped)), stripped }
    }
}

fn refusal(op: &Op, p: Privilege) -> String {
    let what = match p {
        Privilege::SetId => "set-uid/set-gid bits",
        Privilege::Owners => "an owner other than root, or an ACL",
        Privilege::Capabilities => "a security.* or trusted.* attribute",
        Privilege::Devices => "a device node",
    };
    // Not yet checked against the path rules: as long as the peer made it.
    let path = op.path().map(|w| doppel_proto::Echoed::lossy(&w.0)).unwrap_or_default();
    format!("{path}: {what} refused by this target's privilege policy ({} = \"refuse\")", p.key())
}

/// `op` without the parts in `strip`.
fn strip(op: &Op, strip: &[Privilege]) -> Op {
    let setid = strip.contains(&Privilege::SetId);
    let clear = |mode: u32| if setid { mode & !SETID } else { mode };
    match op {
        Op::Create { path, mode } => Op::Create { path: path.clone(), mode: clear(*mode) },
        Op::Mkdir { path, mode } => Op::Mkdir { path: path.clone(), mode: clear(*mode) },
        // Without its device, a device node is an empty regular file: the name still exists
        // (so later ops on it apply, and a restore shows where a device was) and opens nothing.
        Op::Mknod { path, mode, .. } if strip.contains(&Privilege::Devices) => {
            Op::Create { path: path.clone(), mode: clear(*mode) & 0o7777 }
        }
        Op::Mknod { path, mode, rdev } => Op::Mknod { path: path.clone(), mode: clear(*mode), rdev: *rdev },
        Op::SetAttr { path, attrs } => Op::SetAttr { path: path.clone(), attrs: strip_attrs(attrs, strip) },
        other => other.clone(),
    }
}

/// Attributes without the parts in `strip`. Owners are left out, so the file keeps the owner
/// the target gave it (root); privileged attributes are left out of the complete set, so any
/// the file had are removed too.
fn strip_attrs(a: &Attrs, strip: &[Privilege]) -> Attrs {
    let mut a = a.clone();
    if strip.contains(&Privilege::SetId) {
        a.mode = a.mode.map(|m| m & !SETID);
    }
    if strip.contains(&Privilege::Owners) {
        a.uid = a.uid.filter(|&u| u == 0);
        a.gid = a.gid.filter(|&g| g == 0);
    }
    if let Some(x) = &mut a.xattrs {
        x.retain(|x: &Xattr| xattr_privilege(&x.name).is_none_or(|p| !strip.contains(&p)));
    }
    a
}

#[cfg(test)]
mod tests;
