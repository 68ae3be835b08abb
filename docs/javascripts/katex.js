// Renders the maths pymdownx.arithmatex left as \( ... \) and \[ ... \] in .arithmatex elements,
// on the first load and on every page Material's instant navigation swaps in. A formula KaTeX
// cannot parse is reported on the console (the browser test fails on it), not hidden.
document$.subscribe(() => {
  for (const element of document.querySelectorAll(".arithmatex")) {
    const tex = element.textContent.trim();
    const display = tex.startsWith("\\[");
    try {
      katex.render(tex.slice(2, -2), element, { displayMode: display, throwOnError: true });
    } catch (error) {
      console.error(`KaTeX could not render ${tex}: ${error.message}`);
    }
  }
});
