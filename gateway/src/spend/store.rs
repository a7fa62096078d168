//! Where budget counters live: Redis, shared by every gateway replica
//! (one Lua script checks every budget of a request and reserves on all of
//! them, or on none: atomic across replicas), or this process's memory
//! (`moltbot up` without Redis, one gateway).
//!
//! A counter holds committed spend plus the reservations of turns in
//! flight, in nano-USD (`gateway/src/spend/price.rs`); settling adds the
//! difference between the real cost and the reservation. A gateway that
//! dies between the two leaves its reservation counted: the budget fails
//! closed, never open.
//!
//! Keys: `moltbot:spend:v1:{budget}:{window tag}:{bucket start}` and, per
//! window, `…:soft` marking that the soft-limit event was raised.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;

use crate::upstream::redis::Redis;

/// How long one budget command may take before the request is refused
/// with 503 (a budget is never skipped).
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// One budget's part in a reservation.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// Counter keys summed (oldest first); the last takes the amount.
    pub counters: Vec<String>,
    /// Most spend, nano-USD.
    pub max: i64,
    /// Spend at which the soft-limit event is raised, nano-USD.
    pub soft: Option<i64>,
    /// Key marking the soft-limit event raised in this window.
    pub soft_key: String,
    /// Life of the current counter and the soft mark, seconds.
    pub ttl_s: i64,
}

/// What a reservation came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Reserved on every budget; the budgets whose soft limit this
    /// reservation crossed first in their window.
    Held {
        /// Index into the checks, and that budget's spend with this
        /// reservation (nano-USD).
        crossed_soft: Vec<(usize, i64)>,
    },
    /// Nothing reserved: budget `index` has `spent` (nano-USD, in-flight
    /// reservations included) and `amount` does not fit; `oldest` is the
    /// first counter holding spend.
    Refused {
        /// Index into the checks.
        index: usize,
        /// Spend counted, nano-USD.
        spent: i64,
        /// Index of the oldest non-empty counter.
        oldest: usize,
    },
}

/// A budget store.
pub trait BudgetStore: Send + Sync + std::fmt::Debug {
    /// Reserves `amount` nano-USD on every check, or on none when one does
    /// not fit. Errors with the store's failure as text.
    fn reserve<'a>(
        &'a self,
        checks: &'a [Check],
        amount: i64,
    ) -> BoxFuture<'a, Result<Outcome, String>>;
    /// Adds `delta` (negative: gives back) to each counter.
    fn adjust<'a>(
        &'a self,
        counters: &'a [String],
        delta: i64,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// The sum of `counters`, nano-USD.
    fn spent<'a>(&'a self, counters: &'a [String]) -> BoxFuture<'a, Result<i64, String>>;
}

/// Counters in this process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    counters: Mutex<HashMap<String, (i64, Instant)>>,
}

fn poisoned<T>(_: T) -> String {
    "budget counters poisoned".to_owned()
}

impl MemoryStore {
    fn value(map: &HashMap<String, (i64, Instant)>, key: &str, now: Instant) -> i64 {
        map.get(key)
            .filter(|(_, expires)| *expires > now)
            .map_or(0, |(v, _)| *v)
    }
}

impl BudgetStore for MemoryStore {
    fn reserve<'a>(
        &'a self,
        checks: &'a [Check],
        amount: i64,
    ) -> BoxFuture<'a, Result<Outcome, String>> {
        Box::pin(async move {
            let mut map = self.counters.lock().map_err(poisoned)?;
            let now = Instant::now();
            map.retain(|_, (_, expires)| *expires > now);
            let mut totals = Vec::with_capacity(checks.len());
            for (index, c) in checks.iter().enumerate() {
                let values: Vec<i64> = c
                    .counters
                    .iter()
                    .map(|k| Self::value(&map, k, now))
                    .collect();
                let spent: i64 = values.iter().sum();
                if spent + amount > c.max {
                    let oldest = values.iter().position(|v| *v != 0).unwrap_or(0);
                    return Ok(Outcome::Refused {
                        index,
                        spent,
                        oldest,
                    });
                }
                totals.push(spent);
            }
            let mut crossed_soft = Vec::new();
            for (index, c) in checks.iter().enumerate() {
                let ttl = now + Duration::from_secs(c.ttl_s.max(1) as u64);
                if let Some(current) = c.counters.last() {
                    let entry = map.entry(current.clone()).or_insert((0, ttl));
                    entry.0 += amount;
                    entry.1 = ttl;
                }
                if let Some(soft) = c.soft
                    && totals[index] + amount >= soft
                    && Self::value(&map, &c.soft_key, now) == 0
                {
                    map.insert(c.soft_key.clone(), (1, ttl));
                    crossed_soft.push((index, totals[index] + amount));
                }
            }
            Ok(Outcome::Held { crossed_soft })
        })
    }

    fn adjust<'a>(
        &'a self,
        counters: &'a [String],
        delta: i64,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut map = self.counters.lock().map_err(poisoned)?;
            for key in counters {
                if let Some(entry) = map.get_mut(key) {
                    entry.0 += delta;
                }
            }
            Ok(())
        })
    }

    fn spent<'a>(&'a self, counters: &'a [String]) -> BoxFuture<'a, Result<i64, String>> {
        Box::pin(async move {
            let map = self.counters.lock().map_err(poisoned)?;
            let now = Instant::now();
            Ok(counters.iter().map(|k| Self::value(&map, k, now)).sum())
        })
    }
}

/// Counters in Redis.
#[derive(Debug)]
pub struct RedisStore {
    redis: Arc<Redis>,
    reserve: redis::Script,
    adjust: redis::Script,
}

/// KEYS: counters; ARGV: delta. Adds the delta to each counter that still
/// exists (INCRBY on an expired one would recreate it without a TTL).
const ADJUST: &str = r"
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, ARGV[1]) end
end
return 0
";

/// KEYS: every check's counters then its soft key, check after check.
/// ARGV: amount, then per check: its number of counters, max, soft (-1:
/// none), ttl. Returns `{0, index, spent, …}` when held (a 1-based check
/// index and its spend with the amount, for each check whose soft mark
/// this call set), `{index, spent, oldest}` (1-based) when refused.
const RESERVE: &str = r"
local amount = tonumber(ARGV[1])
local k, a = 1, 2
local n = (#ARGV - 1) / 4
local spent, first = {}, {}
for b = 1, n do
  local count, max = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local total, oldest = 0, 0
  for j = 0, count - 1 do
    local v = tonumber(redis.call('GET', KEYS[k + j]) or '0')
    total = total + v
    if v ~= 0 and oldest == 0 then oldest = j + 1 end
  end
  if total + amount > max then return {b, total, oldest} end
  spent[b], first[b] = total, k
  k, a = k + count + 1, a + 4
end
local out = {0}
k, a = 1, 2
for b = 1, n do
  local count, soft, ttl = tonumber(ARGV[a]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local current = KEYS[k + count - 1]
  redis.call('INCRBY', current, amount)
  redis.call('EXPIRE', current, ttl)
  if soft >= 0 and spent[b] + amount >= soft then
    if redis.call('SET', KEYS[k + count], '1', 'NX', 'EX', ttl) then
      table.insert(out, b)
      table.insert(out, spent[b] + amount)
    end
  end
  k, a = k + count + 1, a + 4
end
return out
";

impl RedisStore {
    /// Counters on `redis`.
    pub fn new(redis: Arc<Redis>) -> Self {
        Self {
            redis,
            reserve: redis::Script::new(RESERVE),
            adjust: redis::Script::new(ADJUST),
        }
    }
}

impl BudgetStore for RedisStore {
    fn reserve<'a>(
        &'a self,
        checks: &'a [Check],
        amount: i64,
    ) -> BoxFuture<'a, Result<Outcome, String>> {
        Box::pin(async move {
            let script = &self.reserve;
            let reply: Vec<i64> = self
                .redis
                .run(|mut c| async move {
                    let mut call = script.prepare_invoke();
                    call.arg(amount);
                    for check in checks {
                        for key in &check.counters {
                            call.key(key);
                        }
                        call.key(&check.soft_key);
                        call.arg(check.counters.len())
                            .arg(check.max)
                            .arg(check.soft.unwrap_or(-1))
                            .arg(check.ttl_s.max(1));
                    }
                    call.invoke_async(&mut c).await
                })
                .await?;
            match reply.as_slice() {
                [0, crossed @ ..] if crossed.len() % 2 == 0 => Ok(Outcome::Held {
                    crossed_soft: crossed
                        .chunks(2)
                        .map(|pair| ((pair[0] - 1).max(0) as usize, pair[1]))
                        .collect(),
                }),
                [index, spent, oldest] => Ok(Outcome::Refused {
                    index: (*index - 1).max(0) as usize,
                    spent: *spent,
                    oldest: (*oldest - 1).max(0) as usize,
                }),
                other => Err(format!("unexpected budget script reply {other:?}")),
            }
        })
    }

    fn adjust<'a>(
        &'a self,
        counters: &'a [String],
        delta: i64,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if delta == 0 || counters.is_empty() {
                return Ok(());
            }
            let script = &self.adjust;
            self.redis
                .run(|mut c| async move {
                    let mut call = script.prepare_invoke();
                    for key in counters {
                        call.key(key);
                    }
                    call.arg(delta)
                        .invoke_async::<i64>(&mut c)
                        .await
                        .map(|_| ())
                })
                .await
        })
    }

    fn spent<'a>(&'a self, counters: &'a [String]) -> BoxFuture<'a, Result<i64, String>> {
        Box::pin(async move {
            if counters.is_empty() {
                return Ok(0);
            }
            let values: Vec<Option<i64>> =
                self.redis
                    .run(|mut c| async move {
                        redis::cmd("MGET").arg(counters).query_async(&mut c).await
                    })
                    .await?;
            Ok(values.into_iter().flatten().sum())
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn check(counters: &[&str], max: i64, soft: Option<i64>) -> Check {
        Check {
            counters: counters.iter().map(|s| (*s).to_owned()).collect(),
            max,
            soft,
            soft_key: format!("{}:soft", counters.join(",")),
            ttl_s: 60,
        }
    }

    #[tokio::test]
    async fn reservations_are_all_or_nothing_and_settle_by_difference() {
        let store = MemoryStore::default();
        let key = check(&["k"], 100, Some(80));
        let tenant = check(&["t"], 1_000, None);
        let both = [key.clone(), tenant.clone()];
        assert_eq!(
            store.reserve(&both, 60).await.unwrap(),
            Outcome::Held {
                crossed_soft: vec![]
            }
        );
        // 60 + 60 > 100 on the key: refused, and the tenant untouched.
        assert_eq!(
            store.reserve(&both, 60).await.unwrap(),
            Outcome::Refused {
                index: 0,
                spent: 60,
                oldest: 0
            }
        );
        assert_eq!(store.spent(&tenant.counters).await.unwrap(), 60);
        // The turn cost 10: 50 given back to both.
        store
            .adjust(&["k".to_owned(), "t".to_owned()], -50)
            .await
            .unwrap();
        assert_eq!(store.spent(&key.counters).await.unwrap(), 10);
        // 10 + 75 crosses the soft limit of 80, once.
        assert_eq!(
            store.reserve(&both, 75).await.unwrap(),
            Outcome::Held {
                crossed_soft: vec![(0, 85)]
            }
        );
        store.adjust(&["k".to_owned()], -75).await.unwrap();
        assert_eq!(
            store.reserve(&both, 75).await.unwrap(),
            Outcome::Held {
                crossed_soft: vec![]
            }
        );
    }

    #[tokio::test]
    async fn a_rolling_window_reports_its_oldest_spend() {
        let store = MemoryStore::default();
        store
            .reserve(&[check(&["b2"], 100, None)], 70)
            .await
            .unwrap();
        let window = check(&["b1", "b2", "b3"], 100, None);
        assert_eq!(
            store.reserve(&[window], 40).await.unwrap(),
            Outcome::Refused {
                index: 0,
                spent: 70,
                oldest: 1
            }
        );
    }
}
