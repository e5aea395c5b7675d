//! What a Dockerfile asks for: the final stage's base, the tree steps (COPY,
//! ADD, WORKDIR, RUN) and the image config the other instructions record. No I/O.

use std::collections::BTreeMap;

use crate::dockerfile::{self, DockerfileError, Instruction, Vars, exec_form, expand, invalid, parse_args, words};
use crate::snapshot::ImageConfig;

/// What a stage starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// `FROM scratch`: an empty tree.
    Scratch,
    /// `FROM <reference>`: a registered template (the final stage's parent
    /// in a diff build, or an additional local image).
    Image(String),
    /// `FROM <earlier stage>`: that stage's tree and config (its position among the FROMs).
    Stage(usize),
}

/// A stage to build, and what the earlier text contributed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub base: Base,
    /// Its position among the Dockerfile's FROMs (`COPY --from=<n>` names it so).
    pub position: usize,
    /// `AS name`, if given.
    pub name: Option<String>,
    pub from: Instruction,
    /// Instructions after this FROM, up to the next.
    pub body: Vec<Instruction>,
    /// ARGs declared before the first FROM (value `None`: declared without default).
    pub global_args: BTreeMap<String, Option<String>>,
    /// Earlier stages by position: their `AS` names (for `COPY --from`).
    pub earlier: Vec<Option<String>>,
    /// Things the build log should say (skipped stages, ignored flags).
    pub notes: Vec<String>,
}

impl Stage {
    /// `FROM`'s or `COPY --from`'s reference to an earlier stage: its name, or its position.
    pub fn earlier_stage(&self, reference: &str) -> Option<usize> {
        earlier_stage(&self.earlier, reference)
    }

    /// How the build log names it: `AS` name, else its position.
    pub fn label(&self) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None => self.position.to_string(),
        }
    }
}

fn earlier_stage(earlier: &[Option<String>], reference: &str) -> Option<usize> {
    earlier
        .iter()
        .rposition(|n| n.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(reference)))
        .or_else(|| reference.parse::<usize>().ok().filter(|n| *n < earlier.len()))
}

/// One step of the build, printed as `Step i/n : <text>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub line: usize,
    pub text: String,
    pub action: Action,
}

/// What a step does to the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The FROM step: the base tree is already in place.
    From,
    /// COPY or ADD from the build context.
    Copy(CopyOp),
    /// WORKDIR: create this absolute directory.
    MakeDir(String),
    /// RUN: a command with the tree as `/` ([`crate::step`]).
    Run(RunOp),
    /// Only the image config changes.
    Config,
}

/// A COPY or ADD of context files into the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOp {
    /// `COPY` or `ADD`.
    pub instruction: &'static str,
    pub line: usize,
    /// Context-relative sources as written (after substitution); may hold `*`, `?`.
    pub sources: Vec<String>,
    /// Absolute destination in the image.
    pub dest: String,
    /// The destination is a directory: it ended in `/` (or `.`), or there are several sources.
    pub dest_is_dir: bool,
    pub chmod: Option<u32>,
    pub chown: Option<Chown>,
    /// `--from=`: copy from an earlier stage or another image instead of the context.
    pub from: Option<CopyFrom>,
}

/// Where `COPY --from=` copies from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyFrom {
    /// An earlier stage, by position.
    Stage(usize),
    /// A registered template (an additional local image of the build).
    Image(String),
}

/// A RUN step: what runs, and the image config it runs under at that point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOp {
    /// The shell form wrapped in the image's SHELL (default `/bin/sh -c`), or the exec form as given.
    pub argv: Vec<String>,
    /// `KEY=value`: the stage's ARGs, then the image's ENV (which wins), as Docker gives a RUN.
    pub env: Vec<String>,
    /// Absolute; `/` when the image has none.
    pub workdir: String,
    /// `user[:group]` as USER set it; empty is root.
    pub user: String,
}

/// `--chown=user[:group]`, ids or names (names are looked up in the tree's /etc files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chown {
    pub user: String,
    pub group: Option<String>,
}

/// The build: steps in order and the final image config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub config: ImageConfig,
    pub notes: Vec<String>,
}

/// The stages to build, in Dockerfile order, the final stage last: the
/// final one and those it needs (`FROM <stage>`, `COPY --from=<stage>`),
/// transitively. The others are skipped with a note, as BuildKit does. Only
/// ARG may precede the first FROM. Global ARGs reach FROM through the shared
/// front end ([`dockerfile::stages`]), so each base is the one the build
/// client looked up.
pub fn stages_to_build(instructions: &[Instruction]) -> Result<Vec<Stage>, DockerfileError> {
    dockerfile::check_known(instructions)?;
    if let Some(ins) = instructions.iter().take_while(|i| i.keyword != "FROM").find(|i| i.keyword != "ARG") {
        return Err(invalid(ins, format!("{} before the first FROM (only ARG may come first)", ins.keyword)));
    }
    let found = dockerfile::stages(instructions)?;
    if found.froms.is_empty() {
        return Err(DockerfileError::NoFrom);
    }
    let mut all: Vec<Stage> = Vec::new();
    for (position, line) in found.froms.iter().enumerate() {
        let from = instructions[line.index].clone();
        let end = found.froms.get(position + 1).map_or(instructions.len(), |next| next.index);
        let earlier: Vec<Option<String>> = found.froms[..position].iter().map(|f| f.name.clone()).collect();
        let reference = line.image.clone();
        let base = if reference.eq_ignore_ascii_case("scratch") {
            Base::Scratch
        } else if let Some(p) = earlier_stage(&earlier, &reference).filter(|_| !line.image.is_empty()) {
            Base::Stage(p)
        } else {
            Base::Image(reference)
        };
        let notes = line.flags.iter().map(|flag| format!("line {}: FROM flag {flag} is ignored", from.line)).collect();
        all.push(Stage {
            base,
            position,
            name: line.name.clone(),
            body: instructions[line.index + 1..end].to_vec(),
            from,
            global_args: found.global_args.clone(),
            earlier,
            notes,
        });
    }
    let last = all.len() - 1;
    let mut needed = vec![false; all.len()];
    needed[last] = true;
    for position in (0..all.len()).rev() {
        if !needed[position] {
            continue;
        }
        let stage = &all[position];
        if let Base::Stage(p) = stage.base {
            needed[p] = true;
        }
        for reference in stage.body.iter().filter_map(copy_from_flag) {
            if let Some(p) = stage.earlier_stage(&reference) {
                needed[p] = true;
            }
        }
    }
    let unset = &found.froms[last].unset;
    if !unset.is_empty() {
        let from = &all[last].from;
        return Err(DockerfileError::UnsetInFrom { line: from.line, names: unset.clone(), text: from.text.clone() });
    }
    let skipped: Vec<String> = all
        .iter()
        .filter(|s| !needed[s.position])
        .map(|s| format!("stage {} (line {})", s.label(), s.from.line))
        .collect();
    let mut stages: Vec<Stage> = all.into_iter().filter(|s| needed[s.position]).collect();
    for stage in &stages {
        if !found.froms[stage.position].unset.is_empty() {
            let from = &stage.from;
            return Err(DockerfileError::UnsetInFrom {
                line: from.line,
                names: found.froms[stage.position].unset.clone(),
                text: from.text.clone(),
            });
        }
    }
    if !skipped.is_empty() {
        let last = stages.last_mut().expect("the final stage is needed");
        last.notes.push(format!("not needed by the final stage, so not built: {}", skipped.join(", ")));
    }
    Ok(stages)
}

/// The `--from=` value of a COPY or ADD, if it has one.
fn copy_from_flag(ins: &Instruction) -> Option<String> {
    if ins.keyword != "COPY" && ins.keyword != "ADD" {
        return None;
    }
    let mut rest = ins.args.trim_start();
    while rest.starts_with("--") {
        let (flag, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        if let Some(value) = flag.strip_prefix("--from=") {
            return Some(value.to_owned());
        }
        rest = after.trim_start();
    }
    None
}

fn unsupported(ins: &Instruction, instruction: &str, reason: &str) -> DockerfileError {
    DockerfileError::Unsupported {
        line: ins.line,
        instruction: instruction.to_owned(),
        reason: reason.to_owned(),
        text: ins.text.clone(),
    }
}

/// Plans the final stage on top of `base_config` (empty for scratch, the
/// parent's for diff builds).
pub fn plan(stage: &Stage, base_config: ImageConfig) -> Result<Plan, DockerfileError> {
    let mut config = base_config;
    let mut notes = stage.notes.clone();
    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let mut cmd_set_here = false;
    let mut steps = vec![Step { line: stage.from.line, text: stage.from.text.clone(), action: Action::From }];
    for ins in &stage.body {
        let vars = Vars { args: args.clone(), env: config.env_map() };
        let word = |split: bool| words(&ins.args, &vars, split).map_err(|m| invalid(ins, m));
        let action = match ins.keyword.as_str() {
            "RUN" => Action::Run(run_op(ins, &config, &args, &mut notes)?),
            "HEALTHCHECK" | "ONBUILD" => {
                return Err(unsupported(ins, &ins.keyword, "it only builds a filesystem tree"));
            }
            "FROM" => unreachable!("final_stage splits stages at FROM"),
            "COPY" | "ADD" => Action::Copy(copy_op(ins, &vars, config.workdir_or_root(), stage, &mut notes)?),
            "WORKDIR" => {
                let path = single(ins, word(false)?)?;
                config.workdir = clean_image_path(config.workdir_or_root(), &path);
                Action::MakeDir(config.workdir.clone())
            }
            "ENV" => {
                for (key, value) in pairs(ins, &vars)? {
                    config.set_env(&key, &value);
                }
                Action::Config
            }
            "LABEL" => {
                config.labels.extend(pairs(ins, &vars)?);
                Action::Config
            }
            "ARG" => {
                for (name, value) in parse_args(ins, &vars)? {
                    let value = value.or_else(|| stage.global_args.get(&name).cloned().flatten()).unwrap_or_default();
                    args.insert(name, value);
                }
                Action::Config
            }
            "USER" => {
                config.user = single(ins, word(false)?)?.trim().to_owned();
                Action::Config
            }
            "CMD" => {
                config.cmd = Some(command(ins, &config)?);
                cmd_set_here = true;
                Action::Config
            }
            "ENTRYPOINT" => {
                config.entrypoint = Some(command(ins, &config)?);
                // Docker: a new ENTRYPOINT drops the CMD inherited from the base image.
                if !cmd_set_here {
                    config.cmd = None;
                }
                Action::Config
            }
            "SHELL" => {
                config.shell = exec_form(&ins.args)
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| invalid(ins, "SHELL needs the JSON form, e.g. [\"/bin/bash\", \"-c\"]".into()))?;
                Action::Config
            }
            "EXPOSE" => {
                for port in word(true)? {
                    config.exposed_ports.insert(port_spec(&port).map_err(|m| invalid(ins, m))?);
                }
                Action::Config
            }
            "VOLUME" => {
                let volumes = match exec_form(&ins.args) {
                    Some(list) => list.iter().map(|v| expand(v, &vars)).collect::<Result<Vec<_>, _>>(),
                    None => words(&ins.args, &vars, true),
                }
                .map_err(|m| invalid(ins, m))?;
                if volumes.is_empty() {
                    return Err(invalid(ins, "VOLUME needs a path".into()));
                }
                config.volumes.extend(volumes.iter().map(|v| clean_image_path("/", v)));
                Action::Config
            }
            "STOPSIGNAL" => {
                config.stop_signal = Some(single(ins, word(false)?)?);
                Action::Config
            }
            "MAINTAINER" => {
                notes.push(format!("line {}: MAINTAINER is deprecated and ignored (use a LABEL)", ins.line));
                Action::Config
            }
            other => return Err(DockerfileError::UnknownInstruction { line: ins.line, instruction: other.to_owned() }),
        };
        steps.push(Step { line: ins.line, text: ins.text.clone(), action });
    }
    Ok(Plan { steps, config, notes })
}

/// Exactly one non-empty word.
fn single(ins: &Instruction, words: Vec<String>) -> Result<String, DockerfileError> {
    match words.as_slice() {
        [w] if !w.trim().is_empty() => Ok(w.clone()),
        _ => Err(invalid(ins, format!("{} needs one value", ins.keyword))),
    }
}

/// CMD/ENTRYPOINT: the exec form as given, the shell form wrapped in the shell.
fn command(ins: &Instruction, config: &ImageConfig) -> Result<Vec<String>, DockerfileError> {
    if let Some(exec) = exec_form(&ins.args) {
        return Ok(exec);
    }
    if ins.args.is_empty() {
        return Err(invalid(ins, format!("{} needs a command", ins.keyword)));
    }
    let mut shell = config.shell_or_default();
    shell.push(ins.args.clone());
    Ok(shell)
}

/// RUN: flags, then the exec form (no substitution, as in Docker) or the
/// shell form (the shell substitutes, from the environment built here).
fn run_op(
    ins: &Instruction,
    config: &ImageConfig,
    args: &BTreeMap<String, String>,
    notes: &mut Vec<String>,
) -> Result<RunOp, DockerfileError> {
    let mut rest = ins.args.trim_start();
    while rest.starts_with("--") {
        let (flag, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        match flag.split_once('=').unwrap_or((flag, "")) {
            ("--network", "none") => {}
            ("--network", "default" | "host") => notes.push(format!(
                "line {}: RUN {flag}: local builds have no network egress; the step gets a network of its own \
                 with only loopback",
                ins.line
            )),
            (name, _) => {
                return Err(unsupported(ins, &format!("RUN {name}"), "the flag is not implemented"));
            }
        }
        rest = after.trim_start();
    }
    let argv = match exec_form(rest) {
        Some(argv) => argv,
        None => {
            let mut shell = config.shell_or_default();
            shell.push(rest.to_owned());
            shell
        }
    };
    if argv.is_empty() || argv.last().is_some_and(|w| w.trim().is_empty()) {
        return Err(invalid(ins, "RUN needs a command".into()));
    }
    let env_keys = config.env_map();
    let mut env: Vec<String> =
        args.iter().filter(|(k, _)| !env_keys.contains_key(*k)).map(|(k, v)| format!("{k}={v}")).collect();
    env.extend(config.env.iter().cloned());
    Ok(RunOp { argv, env, workdir: config.workdir_or_root().to_owned(), user: config.user.clone() })
}

/// ENV and LABEL: `k=v k2="v 2"` or the legacy `k value with spaces`.
fn pairs(ins: &Instruction, vars: &Vars) -> Result<Vec<(String, String)>, DockerfileError> {
    let first = ins.args.split_whitespace().next().ok_or_else(|| invalid(ins, "needs KEY=value".into()))?;
    if !first.contains('=') {
        let rest = ins.args[first.len()..].trim();
        if rest.is_empty() {
            return Err(invalid(ins, format!("'{first}' has no value (use {first}=value)")));
        }
        let key = words(first, vars, false).map_err(|m| invalid(ins, m))?.concat();
        let value = words(rest, vars, false).map_err(|m| invalid(ins, m))?.concat();
        return Ok(vec![(key, value)]);
    }
    words(&ins.args, vars, true)
        .map_err(|m| invalid(ins, m))?
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(invalid(ins, format!("expected KEY=value, got '{w}'"))),
        })
        .collect()
}

/// `80`, `80/tcp`, `53/UDP`, `8000-8010` → `port[-port]/proto`.
fn port_spec(spec: &str) -> Result<String, String> {
    let (ports, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
    let proto = proto.to_ascii_lowercase();
    let port_ok = |p: &str| p.parse::<u16>().is_ok_and(|n| n > 0);
    let ports_ok = match ports.split_once('-') {
        Some((a, b)) => port_ok(a) && port_ok(b),
        None => port_ok(ports),
    };
    if !ports_ok || !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("'{spec}' is not a port, port/tcp, port/udp or a port range"));
    }
    Ok(format!("{ports}/{proto}"))
}

fn copy_op(
    ins: &Instruction,
    vars: &Vars,
    workdir: &str,
    stage: &Stage,
    notes: &mut Vec<String>,
) -> Result<CopyOp, DockerfileError> {
    let instruction = if ins.keyword == "ADD" { "ADD" } else { "COPY" };
    let mut rest = ins.args.as_str();
    let mut chmod = None;
    let mut chown = None;
    let mut from = None;
    loop {
        let trimmed = rest.trim_start();
        if !trimmed.starts_with("--") {
            rest = trimmed;
            break;
        }
        let (flag, after) = trimmed.split_once(char::is_whitespace).unwrap_or((trimmed, ""));
        rest = after;
        let (name, value) = flag.split_once('=').unwrap_or((flag, ""));
        let value = words(value, vars, false).map_err(|m| invalid(ins, m))?.concat();
        match name {
            "--from" if value.is_empty() => {
                return Err(invalid(ins, format!("{instruction} --from= needs a stage or an image")));
            }
            "--from" => {
                from = Some(match stage.earlier_stage(&value) {
                    Some(position) => CopyFrom::Stage(position),
                    None if value.eq_ignore_ascii_case("scratch") => {
                        return Err(invalid(ins, format!("{instruction} --from=scratch: scratch has no files")));
                    }
                    None => CopyFrom::Image(value),
                });
            }
            "--chmod" => chmod = Some(parse_chmod(&value).map_err(|m| invalid(ins, m))?),
            "--chown" => {
                let (user, group) = match value.split_once(':') {
                    Some((u, g)) => (u.to_owned(), Some(g.to_owned())),
                    None => (value.clone(), None),
                };
                if user.is_empty() {
                    return Err(invalid(ins, "--chown needs user[:group]".into()));
                }
                chown = Some(Chown { user, group });
            }
            "--link" => notes.push(format!("line {}: {instruction} --link has no effect here", ins.line)),
            _ => return Err(unsupported(ins, &format!("{instruction} {name}"), "the flag is not implemented")),
        }
    }
    let mut list = match exec_form(rest) {
        Some(list) => list.iter().map(|w| expand(w, vars)).collect::<Result<Vec<_>, _>>(),
        None => words(rest, vars, true),
    }
    .map_err(|m| invalid(ins, m))?;
    if list.len() < 2 || list.iter().any(String::is_empty) {
        return Err(invalid(ins, format!("{instruction} needs at least one source and a destination")));
    }
    let raw_dest = list.pop().expect("checked length");
    if from.is_some() && instruction == "ADD" {
        return Err(unsupported(ins, "ADD --from", "Docker's ADD has no --from; use COPY --from"));
    }
    if instruction == "ADD"
        && let Some(url) =
            list.iter().find(|s| ["http://", "https://", "git@", "git://"].iter().any(|p| s.starts_with(p)))
    {
        return Err(unsupported(
            ins,
            &format!("ADD {url}"),
            "it does not fetch URLs; download the file into the build context and COPY it",
        ));
    }
    let dest_is_dir = list.len() > 1 || raw_dest.ends_with('/') || raw_dest == "." || raw_dest.ends_with("/.");
    Ok(CopyOp {
        instruction,
        line: ins.line,
        sources: list,
        dest: clean_image_path(workdir, &raw_dest),
        dest_is_dir,
        chmod,
        chown,
        from,
    })
}

fn parse_chmod(value: &str) -> Result<u32, String> {
    if (3..=4).contains(&value.len()) && value.chars().all(|c| ('0'..='7').contains(&c)) {
        return u32::from_str_radix(value, 8).map_err(|e| e.to_string());
    }
    Err(format!("--chmod={value}: only octal modes such as 0755 or 644 are supported"))
}

/// Joins `path` onto `base` if relative and cleans it lexically (`.`, `..`
/// stop at `/`). Always absolute, no trailing slash except for `/` itself.
pub fn clean_image_path(base: &str, path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let joined = if path.starts_with('/') { path.to_owned() } else { format!("{base}/{path}") };
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerfile::parse;

    fn final_stage(instructions: &[Instruction]) -> Result<Stage, DockerfileError> {
        Ok(stages_to_build(instructions)?.pop().expect("a final stage"))
    }

    fn plan_text(text: &str) -> Result<Plan, DockerfileError> {
        let stage = final_stage(&parse(text))?;
        plan(&stage, ImageConfig::default())
    }

    fn runs(plan: &Plan) -> Vec<&RunOp> {
        plan.steps
            .iter()
            .filter_map(|s| match &s.action {
                Action::Run(op) => Some(op),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn run_takes_the_shell_env_args_workdir_and_user_in_force_at_its_line() {
        let text = "FROM scratch\nARG V=1\nARG SHADOWED=arg\nENV SHADOWED=env A=$V\nRUN echo \"$A\" && \\\n  true\n\
                    WORKDIR /app\nUSER app:staff\nSHELL [\"/bin/bash\", \"-eu\", \"-c\"]\nRUN [\"ls\", \"$V\"]\nRUN later\n";
        let plan = plan_text(text).unwrap();
        let ops = runs(&plan);
        assert_eq!(ops[0].argv, ["/bin/sh", "-c", "echo \"$A\" &&   true"]);
        assert_eq!(ops[0].env, ["V=1", "SHADOWED=env", "A=1"]);
        assert_eq!((ops[0].workdir.as_str(), ops[0].user.as_str()), ("/", ""));
        // The exec form is not substituted, as in Docker.
        assert_eq!(ops[1].argv, ["ls", "$V"]);
        assert_eq!((ops[1].workdir.as_str(), ops[1].user.as_str()), ("/app", "app:staff"));
        assert_eq!(ops[2].argv, ["/bin/bash", "-eu", "-c", "later"]);
    }

    #[test]
    fn run_flags_and_empty_commands_are_named() {
        let plan = plan_text("FROM scratch\nRUN --network=none true\nRUN --network=default true\n").unwrap();
        assert_eq!(runs(&plan)[0].argv, ["/bin/sh", "-c", "true"]);
        assert!(plan.notes.iter().any(|n| n.contains("line 3: RUN --network=default")), "{:?}", plan.notes);
        let err = plan_text("FROM scratch\nRUN --mount=type=cache,target=/c make\n").unwrap_err();
        assert!(err.to_string().starts_with("line 2: RUN --mount is not supported"), "{err}");
        let err = plan_text("FROM scratch\nRUN []\n").unwrap_err();
        assert!(err.to_string().contains("line 2: RUN: RUN needs a command"), "{err}");
    }

    #[test]
    fn copy_from_names_an_earlier_stage_by_name_or_position_else_an_image() {
        let text = "FROM scratch AS build\nCOPY a /a\nFROM scratch\nCOPY --from=build /a /b\nCOPY --from=0 /a /c\n\
                    COPY --from=tools:1.0 /bin/x /x\n";
        let stages = stages_to_build(&parse(text)).unwrap();
        let plan = plan(stages.last().unwrap(), ImageConfig::default()).unwrap();
        let froms: Vec<_> = plan
            .steps
            .iter()
            .filter_map(|s| match &s.action {
                Action::Copy(op) => Some(op.from.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            froms,
            [Some(CopyFrom::Stage(0)), Some(CopyFrom::Stage(0)), Some(CopyFrom::Image("tools:1.0".into()))]
        );
        let err = plan_text("FROM scratch\nCOPY --from=scratch /a /a\n").unwrap_err();
        assert!(err.to_string().contains("scratch has no files"), "{err}");
        let err = plan_text("FROM scratch AS b\nFROM scratch\nADD --from=b /a /a\n").unwrap_err();
        assert!(err.to_string().contains("ADD --from is not supported"), "{err}");
    }

    #[test]
    fn only_the_stages_the_final_one_needs_are_built_in_order() {
        let text = "FROM tpl AS deps\nRUN fetch\nFROM scratch AS unused\nRUN nothing\nFROM deps AS build\nRUN make\n\
                    FROM scratch AS tools\nCOPY t /t\nFROM base\nCOPY --from=build /out /app\nCOPY --from=3 /t /t\n";
        let stages = stages_to_build(&parse(text)).unwrap();
        let picked: Vec<(usize, Base)> = stages.iter().map(|s| (s.position, s.base.clone())).collect();
        assert_eq!(
            picked,
            [(0, Base::Image("tpl".into())), (2, Base::Stage(0)), (3, Base::Scratch), (4, Base::Image("base".into()))]
        );
        let notes = &stages.last().unwrap().notes;
        assert!(notes.iter().any(|n| n.contains("not needed by the final stage, so not built: stage unused (line 3)")));
        // A later stage of the same name shadows an earlier one, as in Docker.
        let stages = stages_to_build(&parse("FROM scratch AS x\nFROM scratch AS x\nFROM x\n")).unwrap();
        assert_eq!(stages.last().unwrap().base, Base::Stage(1));
    }

    #[test]
    fn add_url_is_refused() {
        let err = plan_text("FROM scratch\nADD https://example.com/x.tgz?sig=1 /x\n").unwrap_err();
        assert!(err.to_string().contains("ADD https://example.com/x.tgz?sig=1 is not supported"), "{err}");
    }

    #[test]
    fn from_substitutes_global_args_and_refuses_other_instructions_before_it() {
        let stage = final_stage(&parse("ARG BASE=my-template\nFROM ${BASE} AS final\n")).unwrap();
        assert_eq!(stage.base, Base::Image("my-template".into()));
        assert_eq!(stage.name.as_deref(), Some("final"));
        let err = final_stage(&parse("ENV A=1\nFROM scratch\n")).unwrap_err();
        assert!(err.to_string().contains("line 1: ENV: ENV before the first FROM"), "{err}");
        assert_eq!(final_stage(&parse("# empty\n")).unwrap_err(), DockerfileError::NoFrom);
    }

    #[test]
    fn a_from_arg_without_a_value_is_refused_naming_it() {
        let err = final_stage(&parse("ARG BASE\nFROM $BASE\nCOPY a /a\n")).unwrap_err();
        assert_eq!(
            err,
            DockerfileError::UnsetInFrom { line: 2, names: vec!["BASE".into()], text: "FROM $BASE".into() }
        );
        assert!(err.to_string().starts_with("Dockerfile line 2: FROM $BASE: ARG BASE has no value"), "{err}");
        assert!(err.to_string().ends_with("give it a default, e.g. ARG BASE=<template>"), "{err}");
        // Not even half set: the client did not look `${ORG}/base` up, so it is not built on either.
        let err = final_stage(&parse("FROM ${ORG}/base\n")).unwrap_err();
        assert!(matches!(err, DockerfileError::UnsetInFrom { ref names, .. } if names == &["ORG"]), "{err}");
        // An ARG declared inside a stage never reaches a later FROM.
        let err = final_stage(&parse("FROM scratch AS a\nARG B=x\nFROM $B\n")).unwrap_err();
        assert!(matches!(err, DockerfileError::UnsetInFrom { line: 3, .. }), "{err}");
    }

    #[test]
    fn a_byte_order_mark_and_crlf_build_like_plain_text() {
        let plain = plan_text("ARG V=1\nFROM scratch\nARG V\nCOPY a \\\n  b /c/\nLABEL v=$V\n").unwrap();
        let dos =
            plan_text("\u{feff}ARG V=1\r\nFROM scratch\r\nARG V\r\nCOPY a \\\r\n  b /c/\r\nLABEL v=$V\r\n").unwrap();
        assert_eq!(dos, plain);
        assert_eq!(dos.config.labels["v"], "1");
        let stage = final_stage(&parse("\u{feff}ARG BASE=t\r\nFROM $BASE\r\n")).unwrap();
        assert_eq!(stage.base, Base::Image("t".into()));
    }

    #[test]
    fn unknown_instructions_are_refused_in_any_stage() {
        let err = final_stage(&parse("FROM scratch AS a\nFETCH x\nFROM scratch\n")).unwrap_err();
        assert_eq!(err, DockerfileError::UnknownInstruction { line: 2, instruction: "FETCH".into() });
    }

    #[test]
    fn exec_and_shell_forms_of_cmd_and_entrypoint() {
        let plan = plan_text("FROM scratch\nCMD [\"/app\", \"--serve\"]\nENTRYPOINT exec /init \"$X\"\n").unwrap();
        // A later ENTRYPOINT keeps a CMD set in the same Dockerfile.
        assert_eq!(plan.config.cmd, Some(vec!["/app".into(), "--serve".into()]));
        assert_eq!(plan.config.entrypoint, Some(vec!["/bin/sh".into(), "-c".into(), "exec /init \"$X\"".into()]));
        let plan = plan_text("FROM scratch\nSHELL [\"/bin/bash\", \"-lc\"]\nCMD echo hi\n").unwrap();
        assert_eq!(plan.config.cmd, Some(vec!["/bin/bash".into(), "-lc".into(), "echo hi".into()]));
    }

    #[test]
    fn entrypoint_drops_the_inherited_cmd() {
        let stage = final_stage(&parse("FROM parent\nENTRYPOINT [\"/new\"]\n")).unwrap();
        let base = ImageConfig { cmd: Some(vec!["/old".into()]), ..Default::default() };
        assert_eq!(plan(&stage, base).unwrap().config.cmd, None);
    }

    #[test]
    fn config_instructions_are_recorded_with_substitution() {
        let text = "FROM scratch\nARG VERSION=1.2\nENV APP_HOME=/srv/app PATH=/bin\nENV GREETING hello \"big\" world\n\
                    WORKDIR $APP_HOME\nWORKDIR sub\nUSER app:app\nLABEL version=$VERSION \"org.name\"=\"x y\"\n\
                    EXPOSE 8080 53/UDP 9000-9001\nVOLUME [\"/data\"]\nSTOPSIGNAL SIGTERM\nENV PATH=$PATH:/usr/bin\n";
        let plan = plan_text(text).unwrap();
        let c = &plan.config;
        assert_eq!(c.env, ["APP_HOME=/srv/app", "PATH=/bin:/usr/bin", "GREETING=hello big world"]);
        assert_eq!(c.workdir, "/srv/app/sub");
        assert_eq!(c.user, "app:app");
        assert_eq!(c.labels["version"], "1.2");
        assert_eq!(c.labels["org.name"], "x y");
        assert_eq!(c.exposed_ports.iter().collect::<Vec<_>>(), ["53/udp", "8080/tcp", "9000-9001/tcp"]);
        assert_eq!(c.volumes.iter().collect::<Vec<_>>(), ["/data"]);
        assert_eq!(c.stop_signal.as_deref(), Some("SIGTERM"));
        let dirs: Vec<_> = plan
            .steps
            .iter()
            .filter_map(|s| match &s.action {
                Action::MakeDir(d) => Some(d.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(dirs, ["/srv/app", "/srv/app/sub"]);
        assert_eq!(plan.steps.len(), 12);
        assert_eq!(plan.steps[0].action, Action::From);
    }

    #[test]
    fn copy_destinations_flags_and_forms() {
        let text = "FROM scratch\nWORKDIR /app\nCOPY a.txt .\nCOPY --chmod=0750 --chown=10:20 bin/ tools\n\
                    COPY [\"x y\", \"z\", \"/opt/\"]\nADD one /etc/one\n";
        let plan = plan_text(text).unwrap();
        let ops: Vec<&CopyOp> = plan
            .steps
            .iter()
            .filter_map(|s| match &s.action {
                Action::Copy(op) => Some(op),
                _ => None,
            })
            .collect();
        assert_eq!((ops[0].dest.as_str(), ops[0].dest_is_dir), ("/app", true));
        assert_eq!((ops[1].dest.as_str(), ops[1].dest_is_dir), ("/app/tools", false));
        assert_eq!(ops[1].chmod, Some(0o750));
        assert_eq!(ops[1].chown, Some(Chown { user: "10".into(), group: Some("20".into()) }));
        assert_eq!(ops[2].sources, ["x y", "z"]);
        assert_eq!((ops[2].dest.as_str(), ops[2].dest_is_dir), ("/opt", true));
        assert_eq!((ops[3].instruction, ops[3].dest.as_str(), ops[3].dest_is_dir), ("ADD", "/etc/one", false));
        let err = plan_text("FROM scratch\nCOPY --chmod=u+x a /a\n").unwrap_err();
        assert!(err.to_string().contains("only octal modes"), "{err}");
        let err = plan_text("FROM scratch\nCOPY onlyone\n").unwrap_err();
        assert!(err.to_string().contains("line 2: COPY: COPY needs at least one source and a destination"), "{err}");
        let err = plan_text("FROM scratch\nCOPY --parents a /a\n").unwrap_err();
        assert!(err.to_string().contains("COPY --parents is not supported"), "{err}");
    }

    #[test]
    fn unsupported_instructions_and_bad_arguments_name_the_line() {
        let err = plan_text("FROM scratch\nHEALTHCHECK CMD true\n").unwrap_err();
        assert!(err.to_string().starts_with("line 2: HEALTHCHECK is not supported"), "{err}");
        let err = plan_text("FROM scratch\nEXPOSE http\n").unwrap_err();
        assert!(err.to_string().contains("line 2: EXPOSE: 'http' is not a port"), "{err}");
        let err = plan_text("FROM scratch\nENV =x\n").unwrap_err();
        assert!(err.to_string().contains("line 2: ENV: expected KEY=value"), "{err}");
    }

    #[test]
    fn image_paths_are_cleaned_and_stay_under_root() {
        assert_eq!(clean_image_path("/app", "x/../y/./z/"), "/app/y/z");
        assert_eq!(clean_image_path("/app", "../../../etc"), "/etc");
        assert_eq!(clean_image_path("/", "."), "/");
        assert_eq!(clean_image_path("/a", "/b//c"), "/b/c");
    }
}
