"""Validates outputs against a JSON Schema with the `jsonschema` package (a real validator,
not emberd's grammar).

    python tests/structured/validate.py < {"schema": {...}, "outputs": ["...", ...]}

Prints one JSON object: how many outputs parse and validate, and the first problems.
"""
import json
import sys

import jsonschema

given = json.load(sys.stdin)
validator = jsonschema.Draft202012Validator(given["schema"])
problems = []
for i, text in enumerate(given["outputs"]):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        problems.append(f"output {i} {text!r} does not parse: {e}")
        continue
    errors = [e.message for e in validator.iter_errors(value)]
    if errors:
        problems.append(f"output {i} {text!r}: {'; '.join(errors)}")
print(json.dumps({"checked": len(given["outputs"]), "invalid": len(problems),
                  "problems": problems[:10]}))
