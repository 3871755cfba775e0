//! Alerts: opened by devices and by the configured rules on telemetry, folded while unresolved,
//! acknowledged and resolved by operators or by the rule that opened them.

use fleetgate_protocol::{AlertKind, Severity, Telemetry};

use super::Writer;
use crate::model::{AlertRecord, AlertSource, AlertState, Stamp};
use crate::storage::{self, Tables};
use crate::uplink::event::AlertEvent;

impl Writer {
    /// Opens, bumps or clears rule alerts for one telemetry message.
    pub(super) fn apply_rules(
        &mut self,
        t: &mut Tables<'_>,
        device: &str,
        tel: &Telemetry,
        now: u64,
    ) -> storage::Result<()> {
        for i in 0..self.settings.rules.len() {
            let rule = &self.settings.rules[i];
            let Some(value) = tel.hw.get(rule.metric) else {
                continue;
            };
            if rule.fires(value) {
                let message = format!(
                    "{} {value} {} {}",
                    rule.metric.name(),
                    match rule.trigger {
                        fleetgate_config::Trigger::Above(_) => "above",
                        fleetgate_config::Trigger::Below(_) => "below",
                    },
                    match rule.trigger {
                        fleetgate_config::Trigger::Above(x)
                        | fleetgate_config::Trigger::Below(x) => x,
                    }
                );
                let (kind, severity, metric) = (rule.kind.clone(), rule.severity, rule.metric);
                let source = AlertSource::Rule { metric };
                self.raise(t, device, kind, severity, Some(value), message, source, now)?;
            } else if rule.clears(value) {
                let key = (device.to_owned(), rule.kind.name().to_owned());
                let metric = rule.metric;
                if let Some(&id) = self.open_index.get(&key)
                    && self
                        .unresolved
                        .get(&id)
                        .is_some_and(|a| a.source == AlertSource::Rule { metric })
                {
                    self.resolve(t, id, now, "rule")?;
                }
            }
        }
        Ok(())
    }

    /// Opens an alert, or folds it into the unresolved alert of the same device and kind.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn raise(
        &mut self,
        t: &mut Tables<'_>,
        device: &str,
        kind: AlertKind,
        severity: Severity,
        value: Option<f64>,
        message: String,
        source: AlertSource,
        now: u64,
    ) -> storage::Result<()> {
        let key = dedup_key(device, &kind, &source);
        if let Some(alert) = self
            .open_index
            .get(&key)
            .and_then(|id| self.unresolved.get_mut(id))
        {
            alert.count += 1;
            alert.last_ms = now;
            alert.value = value;
            let escalated = severity > alert.severity;
            alert.severity = alert.severity.max(severity);
            if !message.is_empty() {
                alert.message = message;
            }
            t.put_alert(alert)?;
            if escalated {
                let alert = alert.clone();
                self.record_alert(t, &alert, AlertEvent::Escalated, now)?;
            }
            return Ok(());
        }
        let id = self.next_alert_id;
        self.next_alert_id += 1;
        let alert = AlertRecord {
            id,
            device: device.to_owned(),
            kind,
            severity,
            state: AlertState::Open,
            source,
            opened_ms: now,
            last_ms: now,
            count: 1,
            value,
            message,
            acknowledged: None,
            resolved: None,
        };
        t.put_alert(&alert)?;
        self.record_alert(t, &alert, AlertEvent::Opened, now)?;
        tracing::info!(
            alert = id,
            device,
            kind = alert.kind.name(),
            severity = alert.severity.name(),
            "alert opened"
        );
        self.open_index.insert(key, id);
        self.unresolved.insert(id, alert);
        Ok(())
    }

    pub(super) fn resolve(
        &mut self,
        t: &mut Tables<'_>,
        id: u64,
        now: u64,
        by: &str,
    ) -> storage::Result<Option<AlertRecord>> {
        let Some(mut alert) = self.unresolved.remove(&id) else {
            return Ok(None);
        };
        self.open_index
            .remove(&dedup_key(&alert.device, &alert.kind, &alert.source));
        alert.state = AlertState::Resolved;
        alert.resolved = Some(Stamp {
            at_ms: now,
            by: by.to_owned(),
        });
        t.put_alert(&alert)?;
        self.record_alert(t, &alert, AlertEvent::Resolved, now)?;
        Ok(Some(alert))
    }
}

/// Alerts fold into an unresolved one with the same key: per device and kind, and per model
/// version, cohort and feature for drift (which is about a fleet, not a device).
pub(super) fn dedup_key(device: &str, kind: &AlertKind, source: &AlertSource) -> (String, String) {
    match source {
        AlertSource::Drift(d) => {
            let subject = d.feature.as_deref().unwrap_or("prediction");
            (
                String::new(),
                format!("drift/{}/{}/{}/{subject}", d.model, d.version, d.cohort),
            )
        }
        AlertSource::Device | AlertSource::Rule { .. } => {
            (device.to_owned(), kind.name().to_owned())
        }
    }
}
