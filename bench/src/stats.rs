//! Order statistics of a sample of durations.

use std::time::Duration;

/// A sorted sample.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    sorted: Vec<Duration>,
}

impl Sample {
    /// Sorts `values`.
    pub fn new(mut values: Vec<Duration>) -> Sample {
        values.sort_unstable();
        Sample { sorted: values }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// The `p`-th percentile by the nearest-rank method (a value that occurred, never an
    /// interpolation); zero for an empty sample.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }

    /// Every value, sorted.
    pub fn values(&self) -> &[Duration] {
        &self.sorted
    }

    /// The smallest value.
    pub fn min(&self) -> Duration {
        self.sorted.first().copied().unwrap_or_default()
    }

    /// The median (the lower one for an even count, so it is a value that occurred).
    pub fn median(&self) -> Duration {
        self.percentile(50.0)
    }

    /// The largest value.
    pub fn max(&self) -> Duration {
        self.sorted.last().copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Sample {
        Sample::new(v.iter().map(|&m| Duration::from_millis(m)).collect())
    }

    #[test]
    fn nearest_rank() {
        let s = ms(&[5, 1, 4, 2, 3]);
        assert_eq!(s.min(), Duration::from_millis(1));
        assert_eq!(s.median(), Duration::from_millis(3));
        assert_eq!(s.percentile(99.0), Duration::from_millis(5));
        assert_eq!(s.max(), Duration::from_millis(5));
        let s = ms(&(1..=1000).collect::<Vec<_>>());
        assert_eq!(s.percentile(99.0), Duration::from_millis(990));
        assert_eq!(ms(&[]).percentile(50.0), Duration::ZERO);
    }
}
