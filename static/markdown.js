// Markdown for model output: marked -> highlight.js -> DOMPurify -> DOM, then KaTeX.
//
// Everything the model sends reaches the DOM only through `toFragment()`, which runs
// DOMPurify on marked's HTML. Raw HTML in the model's text is escaped (shown as text),
// external images are never loaded, links open in a new tab without a referrer.
// `StreamRenderer` renders a reply while it streams: completed blocks are rendered once
// and frozen, only the last (unfinished) block is re-rendered, at most once per frame.

import { Marked } from './vendor/marked/marked.esm.js';
import DOMPurify from './vendor/dompurify/purify.es.mjs';
import hljs from './vendor/highlight/highlight.min.js';
import { t } from './i18n.js';

const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
export const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);

// Images: only inline data: images of raster types render; anything else becomes a link.
const SAFE_IMG = /^data:image\/(png|jpe?g|gif|webp);base64,[a-z0-9+/=\s]+$/i;

// --- math (KaTeX, loaded lazily the first time a formula appears) ---------------------
const mathBlock = {
  name: 'mathBlock',
  level: 'block',
  start(src) {
    const m = src.match(/^ {0,3}(\$\$|\\\[)/m);
    return m ? m.index : undefined;
  },
  tokenizer(src) {
    const m = /^ {0,3}\$\$([\s\S]+?)\$\$[ \t]*(?:\n|$)/.exec(src)
      || /^ {0,3}\\\[([\s\S]+?)\\\][ \t]*(?:\n|$)/.exec(src);
    if (m) return { type: 'mathBlock', raw: m[0], text: m[1].trim() };
    return undefined;
  },
  renderer(tok) {
    return `<div class="math math-display">${escapeHtml(tok.text)}</div>\n`;
  },
};

const mathInline = {
  name: 'mathInline',
  level: 'inline',
  start(src) {
    const m = src.match(/\$|\\\(|\\\[/);
    return m ? m.index : undefined;
  },
  tokenizer(src) {
    let m = /^\$\$([^$]+?)\$\$/.exec(src);
    if (m) return { type: 'mathInline', raw: m[0], text: m[1].trim(), display: true };
    m = /^\\\[([\s\S]+?)\\\]/.exec(src);
    if (m) return { type: 'mathInline', raw: m[0], text: m[1].trim(), display: true };
    m = /^\\\(([\s\S]+?)\\\)/.exec(src);
    if (m) return { type: 'mathInline', raw: m[0], text: m[1].trim(), display: false };
    // $x$: no space just inside the dollars and no digit right after the closing one,
    // so "costs $5 and $10" stays text.
    m = /^\$(?!\s)((?:\\\$|[^$\n])+?)(?<!\s)\$(?!\d)/.exec(src);
    if (m) return { type: 'mathInline', raw: m[0], text: m[1], display: false };
    return undefined;
  },
  renderer(tok) {
    const cls = tok.display ? 'math math-display' : 'math math-inline';
    return `<span class="${cls}">${escapeHtml(tok.text)}</span>`;
  },
};

// --- marked --------------------------------------------------------------------------
const md = new Marked({ gfm: true, breaks: true, async: false });

// While a reply streams, its unfinished last block is drawn again on every frame: a huge code
// block is then shown unhighlighted (highlighting is the costly part) until it is complete.
const LIVE_HIGHLIGHT_LIMIT = 6000;
let drawingLive = false;

function codeBlock(text, lang) {
  const language = (lang || '').trim().split(/\s+/)[0].toLowerCase();
  let body;
  let cls = 'hljs';
  if (language && hljs.getLanguage(language) && !(drawingLive && text.length > LIVE_HIGHLIGHT_LIMIT)) {
    try {
      body = hljs.highlight(text, { language, ignoreIllegals: true }).value;
      cls += ` language-${language}`;
    } catch {
      body = escapeHtml(text);
    }
  } else {
    body = escapeHtml(text);
  }
  const label = escapeHtml(language || t('codeLabel'));
  return `<div class="code-block"><div class="code-head"><span class="code-lang">${label}</span>`
    + `<button type="button" class="code-copy" data-action="copy-code">${escapeHtml(t('copy'))}</button></div>`
    + `<pre><code class="${cls}">${body}</code></pre></div>\n`;
}

md.use({
  extensions: [mathBlock, mathInline],
  renderer: {
    code(tok) {
      return codeBlock(tok.text.replace(/\n$/, ''), tok.lang);
    },
    // Raw HTML written by the model is shown as text, never interpreted.
    html(tok) {
      const text = tok.text || tok.raw || '';
      if (/^<br\s*\/?>$/i.test(text.trim())) return '<br>';
      if (tok.block) return `<p class="raw-html">${escapeHtml(text.trim())}</p>\n`;
      return escapeHtml(text);
    },
    image(tok) {
      const href = tok.href || '';
      const alt = tok.text || '';
      if (SAFE_IMG.test(href)) return `<img src="${escapeHtml(href)}" alt="${escapeHtml(alt)}">`;
      return `<a class="img-link" href="${escapeHtml(href)}">${escapeHtml(t('imageLink', { alt: alt || href }))}</a>`;
    },
  },
});

// --- DOMPurify -----------------------------------------------------------------------
const PURIFY = {
  FORBID_TAGS: ['style', 'form', 'textarea', 'select', 'option', 'iframe', 'object', 'embed',
    'svg', 'math', 'link', 'meta', 'base', 'video', 'audio', 'source', 'picture'],
  FORBID_ATTR: ['style', 'id', 'name', 'srcset', 'formaction', 'action'],
  ALLOW_DATA_ATTR: false,
  ADD_ATTR: ['data-action'],
  RETURN_DOM_FRAGMENT: true,
};

DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  const tag = node.nodeName;
  if (tag === 'A') {
    if (node.hasAttribute('href')) {
      node.setAttribute('target', '_blank');
      node.setAttribute('rel', 'noopener noreferrer');
    }
  } else if (tag === 'IMG') {
    const src = node.getAttribute('src') || '';
    if (!SAFE_IMG.test(src)) node.removeAttribute('src');
    node.setAttribute('referrerpolicy', 'no-referrer');
    node.setAttribute('loading', 'lazy');
  } else if (tag === 'INPUT') {
    if (node.getAttribute('type') !== 'checkbox') node.remove();
    else node.setAttribute('disabled', '');
  }
});

/** Sanitized fragment for a markdown string (or for already-lexed tokens). */
export function toFragment(src) {
  const html = typeof src === 'string' ? md.parse(src) : md.parser(src);
  const frag = DOMPurify.sanitize(html, PURIFY);
  return frag;
}

/** Render a finished markdown text into `el` (sanitized), then typeset its math. */
export function renderMarkdown(el, text) {
  el.replaceChildren(toFragment(text || ''));
  renderMath(el);
}

export const lexer = (src) => md.lexer(src);

// --- KaTeX ---------------------------------------------------------------------------
let katexPromise = null;
function loadKatex() {
  if (window.katex) return Promise.resolve(window.katex);
  if (!katexPromise) {
    katexPromise = new Promise((resolve, reject) => {
      const css = document.createElement('link');
      css.rel = 'stylesheet';
      css.href = new URL('./vendor/katex/katex.min.css', import.meta.url).href;
      document.head.appendChild(css);
      const s = document.createElement('script');
      s.src = new URL('./vendor/katex/katex.min.js', import.meta.url).href;
      s.onload = () => (window.katex ? resolve(window.katex) : reject(new Error('katex')));
      s.onerror = () => { katexPromise = null; reject(new Error('katex')); };
      document.head.appendChild(s);
    });
  }
  return katexPromise;
}

/** Typeset the .math placeholders under `root` (their text is the TeX source). */
export function renderMath(root) {
  const nodes = root.querySelectorAll('.math:not(.math-done)');
  if (!nodes.length) return;
  loadKatex().then((katex) => {
    for (const el of nodes) {
      if (!el.isConnected || el.classList.contains('math-done')) continue;
      const tex = el.textContent;
      try {
        // katex.render builds DOM nodes (styles through CSSOM), so it works under a
        // style-src 'self' CSP; trust:false keeps \href and friends disabled.
        katex.render(tex, el, {
          displayMode: el.classList.contains('math-display'),
          throwOnError: false, trust: false, strict: 'ignore', maxExpand: 500, maxSize: 50,
        });
        el.classList.add('math-done');
        el.setAttribute('title', tex);
      } catch {
        el.textContent = tex;
      }
    }
  }).catch(() => { /* KaTeX missing: the TeX source stays readable */ });
}

// --- streaming renderer ----------------------------------------------------------------
const now = () => performance.now();

export class StreamRenderer {
  /** @param {HTMLElement} el container; its children are owned by the renderer */
  constructor(el) {
    this.el = el;
    this.frozen = document.createElement('div');
    this.frozen.className = 'md-frozen';
    this.live = document.createElement('div');
    this.live.className = 'md-live';
    el.replaceChildren(this.frozen, this.live);
    this.text = '';
    this.frozenLen = 0;
    this.frozenText = '';
    this.rendered = null;
    this.frame = 0;
    this.timer = 0;
    this.lastRender = 0;
    this.cost = 0; // ms the last live render took: long blocks render less often
  }

  /** The whole text so far (not a delta). Rendering happens on the next frame. */
  update(text) {
    this.text = text.replace(/\r\n?/g, '\n');
    if (this.frame || this.timer) return;
    const wait = Math.max(0, Math.min(400, this.cost * 4) - (now() - this.lastRender));
    const go = () => { this.timer = 0; this.frame = requestAnimationFrame(() => { this.frame = 0; this.render(false); }); };
    if (wait > 8) this.timer = setTimeout(go, wait); else go();
  }

  /** Render everything now, as final (no cursor, nothing left unfinished). */
  finish(text) {
    if (text !== undefined) this.text = text.replace(/\r\n?/g, '\n');
    cancelAnimationFrame(this.frame);
    clearTimeout(this.timer);
    this.frame = 0;
    this.timer = 0;
    this.render(true);
  }

  render(final) {
    if (this.rendered === this.text && !final) return;
    const started = now();
    if (this.frozenLen && !this.text.startsWith(this.frozenText)) {
      // The text was replaced rather than extended: start over.
      this.frozenLen = 0;
      this.frozenText = '';
      this.frozen.replaceChildren();
    }
    const tail = this.text.slice(this.frozenLen);
    let tokens = md.lexer(tail);
    // Every block but the last non-blank one is complete: render it once, keep it.
    let last = tokens.length - 1;
    while (last >= 0 && tokens[last].type === 'space') last -= 1;
    if (last > 0) {
      const done = tokens.slice(0, last);
      const raw = done.map((tok) => tok.raw).join('');
      if (tail.startsWith(raw)) {
        const frag = toFragment(done);
        const wrap = document.createElement('div');
        wrap.className = 'md-chunk';
        wrap.appendChild(frag);
        this.frozen.appendChild(wrap);
        renderMath(wrap);
        this.frozenLen += raw.length;
        this.frozenText = this.text.slice(0, this.frozenLen);
        tokens = tokens.slice(last);
      }
    }
    drawingLive = !final;
    let frag;
    try {
      frag = toFragment(tokens);
    } finally {
      drawingLive = false;
    }
    this.live.replaceChildren(frag);
    renderMath(this.live);
    this.rendered = this.text;
    this.lastRender = now();
    this.cost = this.lastRender - started;
  }
}

export { DOMPurify, hljs };
