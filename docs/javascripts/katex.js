// Typeset the \( \) and \[ \] spans that pymdownx.arithmatex (generic mode) writes, with the KaTeX
// copy served from docs/assets/katex: equations render without a network.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
});
