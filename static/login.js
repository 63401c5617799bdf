// The sign-in page: language and theme as on the chat page, and the error shown
// when the server sends us back here (?error=1 or a rendered error).
import { setLang, t } from './i18n.js';
import { getPref } from './store.js';

const pref = getPref('theme', 'system');
const dark = pref === 'dark' || (pref === 'system' && window.matchMedia('(prefers-color-scheme: dark)').matches);
document.documentElement.dataset.theme = dark ? 'dark' : 'light';
setLang(getPref('lang', 'auto'));
document.title = t('loginTitle');
const error = document.getElementById('login-error');
const q = new URLSearchParams(window.location.search);
if (q.has('error') || !error.hidden) {
  error.hidden = false;
  error.textContent = t(error.dataset.reason === 'throttled' ? 'loginThrottled' : 'loginWrong');
}
