"""The modules behind docs/gen_reference.py, which imports this folder by path (it is no installed
package): comments (explanations from the code and params.yaml), fields (types, defaults and checks
as YAML text), markup (anchors, escaping), config_page and cli_page (the two pages)."""
