//! `--shard auto`: which share of the inputs this process takes, read from
//! the job scheduler that started it, so one job script serves every task
//! of an array.
//!
//! - SLURM job arrays (`sbatch --array=0-7`, `--array=1-8`, `--array=0-30:10`):
//!   `SLURM_ARRAY_TASK_ID` counted from `SLURM_ARRAY_TASK_MIN` in steps of
//!   `SLURM_ARRAY_TASK_STEP`, of `SLURM_ARRAY_TASK_COUNT`.
//! - SLURM job steps with several tasks (`srun -n 4 caption ...`):
//!   `SLURM_PROCID` of `SLURM_STEP_NUM_TASKS` (else `SLURM_NTASKS`), read only
//!   inside a step (`SLURM_STEP_ID` set): the batch script itself also sees `SLURM_PROCID=0` and the job's
//!   task count, and taking 1/N there would silently skip the rest. An array
//!   whose tasks each run such a step is split both ways.
//! - Kubernetes Indexed Jobs: `JOB_COMPLETION_INDEX` (from 0); Kubernetes
//!   does not tell a pod how many completions there are, so the count comes
//!   from `--shard auto/N` or `CAPTION_SHARD_COUNT` (set in the manifest).

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};

use super::inputs::{ParseShardError, Shard};

/// The environment variable a Kubernetes manifest sets to the job's
/// `completions`, for `--shard auto` without `/N`.
pub const SHARD_COUNT_VAR: &str = "CAPTION_SHARD_COUNT";

/// What `--shard` says: a fixed `K/N`, or `auto` (optionally `auto/N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardArg {
    Fixed(Shard),
    Auto { count: Option<u64> },
}

impl FromStr for ShardArg {
    type Err = ParseShardError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let Some(rest) = text.trim().strip_prefix("auto") else {
            return text.parse().map(ShardArg::Fixed);
        };
        if rest.is_empty() {
            return Ok(ShardArg::Auto { count: None });
        }
        match rest.strip_prefix('/').map(|n| n.trim().parse::<u64>()) {
            Some(Ok(count)) if count > 0 => Ok(ShardArg::Auto { count: Some(count) }),
            _ => Err(ParseShardError::new(format!(
                "expected auto or auto/N (N shards, at least 1), got `{text}`"
            ))),
        }
    }
}

/// A shard and where it came from, for the one line on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub shard: Shard,
    /// e.g. "SLURM array task 3 of 0-7"; none for a fixed `K/N`.
    pub source: Option<String>,
}

impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard {}", self.shard)?;
        if let Some(source) = &self.source {
            write!(f, " ({source})")?;
        }
        Ok(())
    }
}

impl ShardArg {
    /// The shard, `auto` read from the process environment.
    pub fn resolve(&self) -> Result<Resolved> {
        self.resolve_with(|name| std::env::var(name).ok())
    }

    /// The shard, `auto` read through `var` (the environment, or a test's).
    pub fn resolve_with(&self, var: impl Fn(&str) -> Option<String>) -> Result<Resolved> {
        match *self {
            ShardArg::Fixed(shard) => Ok(Resolved {
                shard,
                source: None,
            }),
            ShardArg::Auto { count } => from_scheduler(count, &var),
        }
    }
}

/// A part (index from 0) of a whole, as a scheduler numbers it.
struct Part {
    index: u64,
    count: u64,
    source: String,
}

fn from_scheduler(count: Option<u64>, var: &dyn Fn(&str) -> Option<String>) -> Result<Resolved> {
    let array = slurm_array(var)?;
    let step = slurm_step(var)?;
    let part = match (array, step) {
        (Some(a), Some(s)) => Part {
            index: a.index * s.count + s.index,
            count: a.count * s.count,
            source: format!("{}, {}", a.source, s.source),
        },
        (Some(p), None) | (None, Some(p)) => p,
        (None, None) => match kubernetes(count, var)? {
            Some(p) => p,
            None => bail!(
                "--shard auto: no job scheduler gave this process its share (none of \
                 SLURM_ARRAY_TASK_ID, SLURM_PROCID inside an srun step, JOB_COMPLETION_INDEX \
                 is set); give the share as --shard K/N"
            ),
        },
    };
    if let Some(count) = count {
        ensure!(
            count == part.count,
            "--shard auto/{count}: the scheduler runs {} tasks ({}), not {count}",
            part.count,
            part.source
        );
    }
    Ok(Resolved {
        shard: Shard {
            index: part.index + 1,
            count: part.count,
        },
        source: Some(part.source),
    })
}

/// A whole number from variable `name`, if it is set.
fn number(var: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<u64>> {
    var(name)
        .map(|text| {
            text.trim()
                .parse::<u64>()
                .with_context(|| format!("--shard auto: {name}=`{text}` is not a whole number"))
        })
        .transpose()
}

fn required(var: &dyn Fn(&str) -> Option<String>, name: &str, with: &str) -> Result<u64> {
    number(var, name)?.with_context(|| format!("--shard auto: {with} is set but {name} is not"))
}

fn slurm_array(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<Part>> {
    let Some(id) = number(var, "SLURM_ARRAY_TASK_ID")? else {
        return Ok(None);
    };
    let with = "SLURM_ARRAY_TASK_ID";
    let count = required(var, "SLURM_ARRAY_TASK_COUNT", with)?;
    let min = required(var, "SLURM_ARRAY_TASK_MIN", with)?;
    let step = number(var, "SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
    let max = number(var, "SLURM_ARRAY_TASK_MAX")?;
    let uneven = || {
        anyhow::anyhow!(
            "--shard auto: SLURM array task {id} is not one of {count} evenly spaced ids from \
             {min}{}; submit the array as --array=0-{} (or give --shard K/N)",
            if step > 1 {
                format!(" in steps of {step}")
            } else {
                String::new()
            },
            count.saturating_sub(1)
        )
    };
    // A list such as --array=1,4,9 has no step that reaches every id: each
    // task must know its place, or shards would overlap or go missing.
    if count == 0 || id < min || (id - min) % step != 0 {
        return Err(uneven());
    }
    let index = (id - min) / step;
    let last = min + (count - 1) * step;
    if index >= count || max.is_some_and(|max| max != last) {
        return Err(uneven());
    }
    Ok(Some(Part {
        index,
        count,
        source: if step > 1 {
            format!("SLURM array task {id} of {min}-{last}:{step}")
        } else {
            format!("SLURM array task {id} of {min}-{last}")
        },
    }))
}

fn slurm_step(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<Part>> {
    if var("SLURM_STEP_ID").is_none() && var("SLURM_STEPID").is_none() {
        return Ok(None);
    }
    let Some(procid) = number(var, "SLURM_PROCID")? else {
        return Ok(None);
    };
    // The step's own task count (`srun -n 2` in a job of 4 tasks), else the job's.
    let count = match number(var, "SLURM_STEP_NUM_TASKS")? {
        Some(count) => count,
        None => required(var, "SLURM_NTASKS", "SLURM_PROCID")?,
    };
    ensure!(
        procid < count,
        "--shard auto: SLURM_PROCID={procid} is not below the step's {count} tasks"
    );
    if count == 1 {
        return Ok(None);
    }
    Ok(Some(Part {
        index: procid,
        count,
        source: format!("SLURM task {procid} of {count}"),
    }))
}

fn kubernetes(count: Option<u64>, var: &dyn Fn(&str) -> Option<String>) -> Result<Option<Part>> {
    let Some(index) = number(var, "JOB_COMPLETION_INDEX")? else {
        return Ok(None);
    };
    let count = match count {
        Some(count) => count,
        None => number(var, SHARD_COUNT_VAR)?.with_context(|| {
            format!(
                "--shard auto: JOB_COMPLETION_INDEX={index} (a Kubernetes Indexed Job) does not \
                 say how many completions there are: give --shard auto/N or set {SHARD_COUNT_VAR}"
            )
        })?,
    };
    ensure!(
        count > 0 && index < count,
        "--shard auto: JOB_COMPLETION_INDEX={index} is not below the job's {count} completions"
    );
    Ok(Some(Part {
        index,
        count,
        source: format!("Kubernetes completion index {index} of {count}"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(arg: &str, env: &[(&str, &str)]) -> Result<Resolved> {
        let arg: ShardArg = arg.parse().unwrap();
        arg.resolve_with(|name| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    fn shard(arg: &str, env: &[(&str, &str)]) -> String {
        resolve(arg, env).unwrap().shard.to_string()
    }

    fn error(arg: &str, env: &[(&str, &str)]) -> String {
        format!("{:#}", resolve(arg, env).unwrap_err())
    }

    fn array(id: &str, min: &str, count: &str) -> Vec<(&'static str, String)> {
        vec![
            ("SLURM_ARRAY_TASK_ID", id.into()),
            ("SLURM_ARRAY_TASK_MIN", min.into()),
            ("SLURM_ARRAY_TASK_COUNT", count.into()),
        ]
    }

    fn borrowed<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
        env.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    #[test]
    fn parses_fixed_auto_and_auto_with_a_count() {
        assert_eq!(
            "2/8".parse::<ShardArg>().unwrap(),
            ShardArg::Fixed(Shard { index: 2, count: 8 })
        );
        assert_eq!(
            "auto".parse::<ShardArg>().unwrap(),
            ShardArg::Auto { count: None }
        );
        assert_eq!(
            "auto/6".parse::<ShardArg>().unwrap(),
            ShardArg::Auto { count: Some(6) }
        );
        for bad in ["auto/0", "auto/x", "autox", "auto/"] {
            let err = bad.parse::<ShardArg>().unwrap_err().to_string();
            assert!(err.contains("auto/N"), "{bad}: {err}");
        }
        assert!("9/8".parse::<ShardArg>().is_err());
    }

    #[test]
    fn a_slurm_array_from_0_or_from_1_gives_every_shard_once() {
        for (min, ids) in [(0, 0..8), (1, 1..9)] {
            let shards: Vec<String> = ids
                .map(|id| {
                    let env = array(&id.to_string(), &min.to_string(), "8");
                    shard("auto", &borrowed(&env))
                })
                .collect();
            let expected: Vec<String> = (1..=8).map(|k| format!("{k}/8")).collect();
            assert_eq!(shards, expected);
        }
        let mut env = array("3", "0", "8");
        env.push(("SLURM_ARRAY_TASK_MAX", "7".into()));
        let resolved = resolve("auto", &borrowed(&env)).unwrap();
        assert_eq!(
            resolved.to_string(),
            "shard 4/8 (SLURM array task 3 of 0-7)"
        );
    }

    #[test]
    fn a_stepped_array_counts_its_steps_and_an_uneven_list_is_refused() {
        let stepped = |id: &str| {
            let mut env = array(id, "0", "4");
            env.push(("SLURM_ARRAY_TASK_STEP", "10".into()));
            env.push(("SLURM_ARRAY_TASK_MAX", "30".into()));
            env
        };
        assert_eq!(shard("auto", &borrowed(&stepped("20"))), "3/4");
        assert!(error("auto", &borrowed(&stepped("15"))).contains("evenly spaced"));
        // --array=1,4,9: three tasks, ids not evenly spaced.
        let mut list = array("4", "1", "3");
        list.push(("SLURM_ARRAY_TASK_MAX", "9".into()));
        let err = error("auto", &borrowed(&list));
        assert!(err.contains("--array=0-2"), "{err}");
    }

    #[test]
    fn srun_tasks_split_only_inside_a_step_and_combine_with_an_array() {
        let tasks = [("SLURM_PROCID", "2"), ("SLURM_NTASKS", "4")];
        // In the batch script itself: no step, no share.
        assert!(error("auto", &tasks).contains("no job scheduler"));
        let mut in_step = tasks.to_vec();
        in_step.push(("SLURM_STEP_ID", "0"));
        assert_eq!(shard("auto", &in_step), "3/4");
        // Array task 1 of 0-2, each running 4 tasks: 12 shards.
        let array_env = array("1", "0", "3");
        let mut both = borrowed(&array_env);
        both.extend(in_step.iter().copied());
        assert_eq!(shard("auto", &both), "7/12");
        // srun -n 2 in a job of 4 tasks: the step's count.
        let mut smaller = in_step.clone();
        smaller[0] = ("SLURM_PROCID", "1");
        smaller.push(("SLURM_STEP_NUM_TASKS", "2"));
        assert_eq!(shard("auto", &smaller), "2/2");
        let single = [
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("SLURM_STEP_ID", "0"),
        ];
        assert!(error("auto", &single).contains("no job scheduler"));
    }

    #[test]
    fn a_kubernetes_index_needs_its_count() {
        let index = [("JOB_COMPLETION_INDEX", "5")];
        assert_eq!(shard("auto/8", &index), "6/8");
        let err = error("auto", &index);
        assert!(
            err.contains(SHARD_COUNT_VAR) && err.contains("auto/N"),
            "{err}"
        );
        let counted = [("JOB_COMPLETION_INDEX", "5"), (SHARD_COUNT_VAR, "6")];
        assert_eq!(
            resolve("auto", &counted).unwrap().to_string(),
            "shard 6/6 (Kubernetes completion index 5 of 6)"
        );
        assert!(error("auto/5", &index).contains("not below"));
    }

    #[test]
    fn a_count_that_disagrees_with_the_scheduler_and_bad_numbers_are_refused() {
        let env = array("0", "0", "4");
        let err = error("auto/8", &borrowed(&env));
        assert!(err.contains("runs 4 tasks"), "{err}");
        let err = error("auto", &[("SLURM_ARRAY_TASK_ID", "x")]);
        assert!(err.contains("SLURM_ARRAY_TASK_ID=`x`"), "{err}");
        let err = error("auto", &[("SLURM_ARRAY_TASK_ID", "1")]);
        assert!(err.contains("SLURM_ARRAY_TASK_COUNT"), "{err}");
        assert_eq!(resolve("3/4", &[]).unwrap().to_string(), "shard 3/4");
    }
}
