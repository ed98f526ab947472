//! QMP's dirty-rate commands (QEMU's names and shapes): `calc-dirty-rate` and
//! `query-dirty-rate` in `dirty-ring` mode, and the per-vCPU dirty limit
//! (`set-vcpu-dirty-limit`, `query-vcpu-dirty-limit`, `cancel-vcpu-dirty-limit`), on
//! [`crate::dirty_rate`].
//!
//! Ferry measures with the KVM dirty rings only: `mode` defaults to `dirty-ring` (QEMU's
//! default, `page-sampling`, is refused when named, as is `dirty-bitmap`), and a VM
//! without rings refuses all of these. A measurement and a limit work during a migration:
//! all of them count the entries wherever they are harvested (see `dirty_rate`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::commands::{api_failure, check_args, Shared};
use super::protocol::Failure;
use crate::dirty_rate::{mib_per_s, DirtyRateError, Sample};

/// `calc-time` bounds, in milliseconds (1 to 60 s, as QEMU; 50 ms the shortest in ms).
const MIN_CALC_MS: u64 = 50;
const MAX_CALC_MS: u64 = 60_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum Status {
    #[default]
    Unstarted,
    Measuring,
    Measured,
}

/// The last `calc-dirty-rate`, as `query-dirty-rate` reports it.
#[derive(Debug, Default)]
pub struct RateState {
    status: Status,
    /// Unix time, seconds.
    start_time: i64,
    calc_ms: u64,
    /// The rates (None: the VM ended during the measurement).
    result: Option<Measured>,
}

/// One measurement: QEMU's whole MiB/s, and Ferry's exact pages per second (QMP's
/// integer MiB/s is coarse at low rates: 1 MiB/s is 256 pages/s).
#[derive(Debug)]
struct Measured {
    mib: (i64, Vec<i64>),
    pages_per_s: (f64, Vec<f64>),
}

pub type Rates = Mutex<RateState>;

fn failure(e: DirtyRateError) -> Failure {
    Failure::generic(e.to_string())
}

fn int_arg(args: &Map<String, Value>, name: &str) -> Result<Option<i128>, Failure> {
    match args.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .map(i128::from)
            .or_else(|| v.as_u64().map(i128::from))
            .map(Some)
            .ok_or_else(|| {
                Failure::generic(format!(
                    "Invalid parameter type for '{name}', expected: integer (got {v})"
                ))
            }),
    }
}

/// `calc-time-unit`: true for milliseconds.
fn unit_arg(args: &Map<String, Value>) -> Result<bool, Failure> {
    match args.get("calc-time-unit").and_then(Value::as_str) {
        None | Some("second") => Ok(false),
        Some("millisecond") => Ok(true),
        Some(u) => Err(Failure::generic(format!(
            "Parameter 'calc-time-unit' does not accept value '{u}' (second or millisecond)"
        ))),
    }
}

fn lock(r: &Rates) -> std::sync::MutexGuard<'_, RateState> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// `calc-dirty-rate`: samples the rings now and again after `calc-time`, on a thread of
/// its own; answers `{}` once the first sample is taken.
pub fn calc(shared: &Arc<Shared>, args: &Map<String, Value>) -> Result<Value, Failure> {
    check_args(
        args,
        &[
            ("calc-time", "int", true),
            ("calc-time-unit", "string", false),
            ("sample-pages", "int", false),
            ("mode", "string", false),
        ],
    )?;
    match args
        .get("mode")
        .and_then(Value::as_str)
        .unwrap_or("dirty-ring")
    {
        "dirty-ring" => {}
        m @ ("page-sampling" | "dirty-bitmap") => {
            return Err(Failure::generic(format!(
                "mode '{m}' is not supported by Ferry: it measures with the KVM dirty rings \
                 only (mode 'dirty-ring'), counting each vCPU's ring entries"
            )))
        }
        m => {
            return Err(Failure::generic(format!(
                "Parameter 'mode' does not accept value '{m}'"
            )))
        }
    }
    if let Some(n) = int_arg(args, "sample-pages")? {
        return Err(Failure::generic(format!(
            "sample-pages {n}: only for mode 'page-sampling'; mode 'dirty-ring' counts every \
             dirtied page"
        )));
    }
    let ms_unit = unit_arg(args)?;
    let t = int_arg(args, "calc-time")?.unwrap_or_default();
    let ms = if ms_unit { t } else { t.saturating_mul(1000) };
    if !(i128::from(MIN_CALC_MS)..=i128::from(MAX_CALC_MS)).contains(&ms) {
        return Err(Failure::generic(format!(
            "calc-time {t} {} is out of range: 1 to 60 seconds ({MIN_CALC_MS} to \
             {MAX_CALC_MS} milliseconds)",
            if ms_unit { "ms" } else { "s" },
        )));
    }
    let ms = ms as u64;
    let machine = shared.vmm.machine("calc-dirty-rate").map_err(api_failure)?;
    let mut st = lock(&shared.rates);
    if st.status == Status::Measuring {
        return Err(Failure::generic(format!(
            "the dirty rate is already being measured (a {} ms window started at {})",
            st.calc_ms, st.start_time
        )));
    }
    let watch = machine.ring_watch();
    watch
        .watch("calc-dirty-rate mode 'dirty-ring'")
        .map_err(failure)?;
    let first = match watch.sample() {
        Ok(s) => s,
        Err(e) => {
            watch.unwatch();
            return Err(failure(e));
        }
    };
    let weak = Arc::downgrade(&machine);
    drop(machine);
    let me = shared.clone();
    // The thread holds the machine weakly: a VM that ends (a completed migration, quit)
    // is not kept running by a measurement.
    let spawned = std::thread::Builder::new()
        .name("dirty-rate".into())
        .spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            let result = weak.upgrade().and_then(|m| {
                let second = m.ring_watch().sample();
                m.ring_watch().unwatch();
                match second {
                    Ok(s) => Some(rates(&first, &s)),
                    Err(e) => {
                        log::warn!("calc-dirty-rate: the closing sample failed: {e}");
                        None
                    }
                }
            });
            let mut st = lock(&me.rates);
            st.result = result;
            st.status = Status::Measured;
        });
    if let Err(e) = spawned {
        if let Ok(m) = shared.vmm.machine("calc-dirty-rate") {
            m.ring_watch().unwatch();
        }
        return Err(Failure::generic(format!(
            "cannot start the dirty-rate thread: {e}"
        )));
    }
    *st = RateState {
        status: Status::Measuring,
        start_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
        calc_ms: ms,
        result: None,
    };
    Ok(json!({}))
}

/// The rates over the window between two samples, in all and per vCPU.
fn rates(a: &Sample, b: &Sample) -> Measured {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    let per: Vec<u64> = b
        .pages
        .iter()
        .zip(a.pages.iter().chain(std::iter::repeat(&0)))
        .map(|(y, x)| y.saturating_sub(*x))
        .collect();
    log::info!("calc-dirty-rate: {per:?} pages per vCPU in {secs:.3} s");
    let total: u64 = per.iter().sum();
    let exact = |p: u64| if secs > 0.0 { p as f64 / secs } else { 0.0 };
    Measured {
        mib: (
            mib_per_s(total, secs),
            per.iter().map(|&p| mib_per_s(p, secs)).collect(),
        ),
        pages_per_s: (exact(total), per.iter().map(|&p| exact(p)).collect()),
    }
}

/// `query-dirty-rate`.
pub fn query(shared: &Shared, args: &Map<String, Value>) -> Result<Value, Failure> {
    check_args(args, &[("calc-time-unit", "string", false)])?;
    let ms_unit = unit_arg(args)?;
    let st = lock(&shared.rates);
    let mut out = json!({
        "status": match st.status {
            Status::Unstarted => "unstarted",
            Status::Measuring => "measuring",
            Status::Measured => "measured",
        },
        "start-time": st.start_time,
        "calc-time": if ms_unit { st.calc_ms } else { st.calc_ms / 1000 },
        "calc-time-unit": if ms_unit { "millisecond" } else { "second" },
        "sample-pages": 0,
        "mode": "dirty-ring",
    });
    if let (Status::Measured, Some(m)) = (st.status, &st.result) {
        let ((total, per), (exact_total, exact_per)) = (&m.mib, &m.pages_per_s);
        out["dirty-rate"] = json!(total);
        // Ferry's extension (QMP clients ignore members they do not know).
        out["x-ferry-pages-per-second"] = json!(exact_total);
        out["vcpu-dirty-rate"] = per
            .iter()
            .zip(exact_per)
            .enumerate()
            .map(|(i, (r, e))| json!({"id": i, "dirty-rate": r, "x-ferry-pages-per-second": e}))
            .collect();
    }
    Ok(out)
}

/// `set-vcpu-dirty-limit`.
pub fn set_limit(shared: &Shared, args: &Map<String, Value>) -> Result<Value, Failure> {
    check_args(
        args,
        &[("cpu-index", "int", false), ("dirty-rate", "int", true)],
    )?;
    let index = int_arg(args, "cpu-index")?;
    let rate = int_arg(args, "dirty-rate")?.unwrap_or_default();
    let machine = shared
        .vmm
        .machine("set-vcpu-dirty-limit")
        .map_err(api_failure)?;
    machine
        .ring_watch()
        .set_limit(index.map(clamp_i64), rate)
        .map_err(failure)?;
    Ok(json!({}))
}

/// `cancel-vcpu-dirty-limit`.
pub fn cancel_limit(shared: &Shared, args: &Map<String, Value>) -> Result<Value, Failure> {
    check_args(args, &[("cpu-index", "int", false)])?;
    let index = int_arg(args, "cpu-index")?;
    let machine = shared
        .vmm
        .machine("cancel-vcpu-dirty-limit")
        .map_err(api_failure)?;
    machine
        .ring_watch()
        .cancel_limit(index.map(clamp_i64))
        .map_err(failure)?;
    Ok(json!({}))
}

/// `query-vcpu-dirty-limit`: the limited vCPUs (an empty list when none).
pub fn query_limits(shared: &Shared, args: &Map<String, Value>) -> Result<Value, Failure> {
    check_args(args, &[])?;
    let machine = shared
        .vmm
        .machine("query-vcpu-dirty-limit")
        .map_err(api_failure)?;
    if !machine.ring_watch().has_rings() {
        return Err(failure(DirtyRateError::NoRings {
            what: "query-vcpu-dirty-limit",
        }));
    }
    Ok(machine
        .ring_watch()
        .limits_info()
        .into_iter()
        .map(|l| {
            json!({
                "cpu-index": l.cpu_index,
                "limit-rate": l.limit_rate,
                "current-rate": l.current_rate,
            })
        })
        .collect())
}

/// A `cpu-index` beyond i64 (a huge u64) stays out of range, named as large as it fits.
fn clamp_i64(v: i128) -> i64 {
    v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn window_rates_per_vcpu_and_in_all() {
        let at = Instant::now();
        let a = Sample {
            at,
            pages: vec![100, 200],
        };
        let b = Sample {
            at: at + Duration::from_secs(2),
            pages: vec![100 + 2 * 2560, 200 + 2 * 5120],
        };
        let m = rates(&a, &b);
        assert_eq!(m.mib, (30, vec![10, 20]));
        assert_eq!(m.pages_per_s, (7680.0, vec![2560.0, 5120.0]));
    }

    #[test]
    fn unit_and_integers_are_checked() {
        let m = |v: Value| v.as_object().unwrap().clone();
        assert!(!unit_arg(&m(json!({}))).unwrap());
        assert!(unit_arg(&m(json!({"calc-time-unit": "millisecond"}))).unwrap());
        let e = unit_arg(&m(json!({"calc-time-unit": "hour"}))).unwrap_err();
        assert!(e.desc.contains("'hour'"), "{}", e.desc);
        assert_eq!(int_arg(&m(json!({"x": -4})), "x").unwrap(), Some(-4));
        let e = int_arg(&m(json!({"x": 1.5})), "x").unwrap_err();
        assert!(
            e.desc.contains("'x'") && e.desc.contains("1.5"),
            "{}",
            e.desc
        );
    }
}
