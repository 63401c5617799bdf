// Every string the interface shows, in English and Chinese. Nothing else in static/ holds
// user-facing text: the template's English defaults are replaced from here at start.
//
// In the template: data-i18n="key" sets textContent; data-i18n-attr="attr:key;attr2:key2"
// sets attributes (aria-label, title, placeholder).

const STRINGS = {
  en: {
    appName: 'NexLM',
    newChat: 'New chat',
    newChatShort: 'New',
    conversations: 'Conversations',
    conversation: 'Conversation',
    untitled: 'New chat',
    noConversations: 'No conversations yet',
    deleteConversation: 'Delete conversation',
    confirmDelete: 'Delete?',
    openSidebar: 'Show conversations',
    closeSidebar: 'Hide conversations',
    model: 'Model',
    modelUnavailable: '{label} — unavailable: {reason}',
    modelsLoading: 'Loading models…',
    modelsFailed: 'Could not load models',
    settings: 'Settings',
    export: 'Export',
    exportMarkdown: 'Export as Markdown',
    exportJson: 'Export as JSON',
    exportEmpty: 'Nothing to export yet.',
    theme: 'Theme',
    themeSystem: 'System',
    themeLight: 'Light',
    themeDark: 'Dark',
    toggleTheme: 'Switch light/dark theme',
    language: 'Language',
    langAuto: 'Browser default',
    switchLanguage: '中文',
    switchLanguageLabel: 'Switch the interface to Chinese',
    transport: 'Connection',
    transportWs: 'WebSocket',
    transportSse: 'SSE (HTTP)',
    // connection indicator
    connConnecting: 'Connecting…',
    connOnline: 'Connected',
    connReconnecting: 'Reconnecting…',
    connOfflineRetry: 'Offline · retrying in {s} s',
    connOffline: 'Offline',
    connRetryNow: 'Connection status. Click to retry now.',
    // composer
    messageLabel: 'Message',
    skipToInput: 'Skip to the message box',
    placeholder: 'Send a message…',
    send: 'Send',
    stop: 'Stop',
    composerHint: 'Enter to send · Shift+Enter for a new line · Esc to stop',
    queuedNote: 'Offline: your message will be sent when the connection is back.',
    cancelQueued: 'Cancel',
    busyNote: 'Wait for the reply to finish, or stop it.',
    // messages
    you: 'You',
    assistant: 'Assistant',
    copy: 'Copy',
    copied: 'Copied',
    copyMessage: 'Copy message',
    edit: 'Edit',
    editMessage: 'Edit and resend',
    saveAndSend: 'Save & send',
    cancel: 'Cancel',
    regenerate: 'Regenerate',
    regenerateReply: 'Regenerate this reply',
    codeLabel: 'text',
    imageLink: '[image: {alt}]',
    thinking: 'Thinking…',
    thoughtFor: 'Thought for {s} s',
    thoughts: 'Thoughts',
    queued: 'Queued',
    sending: 'Sending…',
    waiting: 'Waiting for the model…',
    stopped: 'Stopped',
    truncated: 'Cut off: max tokens reached',
    interrupted: 'Interrupted',
    failed: 'Failed',
    metaTokens: '{n} tokens',
    metaTtft: 'TTFT {s} s',
    metaTtftMs: 'TTFT {ms} ms',
    metaTps: '{n} tok/s',
    metaTime: '{s} s',
    metaFallback: '{from} failed, answered by {to}',
    jumpToLatest: 'Jump to latest',
    replyDone: 'Reply finished.',
    replyStopped: 'Reply stopped.',
    emptyTitle: 'How can I help you today?',
    emptySub: 'Replies stream in as they are written. Your conversations stay in this browser.',
    suggest1: 'Explain the difference between TCP and UDP in a table',
    suggest2: 'Write a Python function that merges two sorted lists',
    suggest3: 'Summarize the key ideas of the transformer architecture',
    suggest4: 'Solve x² − 5x + 6 = 0 step by step',
    // settings dialog
    settingsTitle: 'Settings',
    convSettings: 'This conversation',
    uiSettings: 'Interface',
    systemPrompt: 'System prompt',
    systemPromptPlaceholder: 'Optional instructions for the model (server default if empty)',
    temperature: 'Temperature',
    topP: 'Top P',
    maxTokens: 'Max tokens',
    serverDefault: 'default',
    resetDefaults: 'Reset to defaults',
    save: 'Save',
    close: 'Close',
    paramSystem: 'system prompt',
    paramsShown: 'Parameters of this conversation',
    // errors
    errorTitle: 'Error',
    // error titles by code (the server's message follows the title)
    'code.bad_request': 'Bad request',
    'code.unknown_model': 'Unknown model',
    'code.provider_unavailable': 'Model unavailable',
    'code.busy': 'Busy',
    'code.upstream_error': 'The model failed',
    'code.rate_limited': 'Too many requests',
    'code.upstream_timeout': 'The model timed out',
    'code.internal_error': 'Server error',
    'code.shutting_down': 'Server restarting',
    'code.session_expired': 'Conversation closed',
    'code.unauthorized': 'Sign-in needed',
    'code.forbidden_origin': 'Not allowed from this site',
    'code.not_found': 'Not found',
    'code.restore_failed': 'Could not restore',
    'code.http_error': 'Request failed',
    'code.too_large': 'Too large',
    errBusy: 'A reply is still streaming. Stop it or wait for it to finish.',
    errRestore: 'The server had forgotten this conversation; its history was restored from this browser.',
    errRestoreFailed: 'The server had forgotten this conversation and it could not be restored: {message}',
    errSessionExpired: 'The server closed this conversation; reconnecting…',
    errNetwork: 'The request could not reach the server.',
    errEditOld: 'This message is too old to edit on the server.',
    errUnknown: 'Something went wrong.',
    loginTitle: 'Sign in · NexLM',
    loginHeading: 'Sign in to NexLM',
    loginSub: 'This server needs an access token.',
    loginToken: 'Access token',
    loginSubmit: 'Sign in',
    loginWrong: 'That token is not valid.',
  },
  zh: {
    appName: 'NexLM',
    newChat: '新建对话',
    newChatShort: '新建',
    conversations: '对话列表',
    conversation: '对话内容',
    untitled: '新对话',
    noConversations: '还没有对话',
    deleteConversation: '删除对话',
    confirmDelete: '确认删除?',
    openSidebar: '显示对话列表',
    closeSidebar: '隐藏对话列表',
    model: '模型',
    modelUnavailable: '{label} — 不可用:{reason}',
    modelsLoading: '正在加载模型…',
    modelsFailed: '无法加载模型列表',
    settings: '设置',
    export: '导出',
    exportMarkdown: '导出为 Markdown',
    exportJson: '导出为 JSON',
    exportEmpty: '还没有可导出的内容。',
    theme: '主题',
    themeSystem: '跟随系统',
    themeLight: '浅色',
    themeDark: '深色',
    toggleTheme: '切换浅色/深色主题',
    language: '语言',
    langAuto: '跟随浏览器',
    switchLanguage: 'English',
    switchLanguageLabel: 'Switch the interface to English',
    transport: '连接方式',
    transportWs: 'WebSocket',
    transportSse: 'SSE(HTTP)',
    connConnecting: '正在连接…',
    connOnline: '已连接',
    connReconnecting: '正在重新连接…',
    connOfflineRetry: '已断开 · {s} 秒后重试',
    connOffline: '已断开',
    connRetryNow: '连接状态。点击立即重试。',
    messageLabel: '消息',
    skipToInput: '跳到输入框',
    placeholder: '输入消息…',
    send: '发送',
    stop: '停止',
    composerHint: 'Enter 发送 · Shift+Enter 换行 · Esc 停止',
    queuedNote: '当前离线:连接恢复后会自动发送你的消息。',
    cancelQueued: '取消',
    busyNote: '请等待回复结束,或先停止它。',
    you: '你',
    assistant: '助手',
    copy: '复制',
    copied: '已复制',
    copyMessage: '复制消息',
    edit: '编辑',
    editMessage: '编辑并重新发送',
    saveAndSend: '保存并发送',
    cancel: '取消',
    regenerate: '重新生成',
    regenerateReply: '重新生成这条回复',
    codeLabel: '文本',
    imageLink: '[图片:{alt}]',
    thinking: '思考中…',
    thoughtFor: '已思考 {s} 秒',
    thoughts: '思考过程',
    queued: '排队中',
    sending: '发送中…',
    waiting: '等待模型响应…',
    stopped: '已停止',
    truncated: '已截断:达到最大 token 数',
    interrupted: '已中断',
    failed: '失败',
    metaTokens: '{n} tokens',
    metaTtft: '首字 {s} 秒',
    metaTtftMs: '首字 {ms} 毫秒',
    metaTps: '{n} tok/s',
    metaTime: '{s} 秒',
    metaFallback: '{from} 出错,已由 {to} 回答',
    jumpToLatest: '跳到最新',
    replyDone: '回复完成。',
    replyStopped: '回复已停止。',
    emptyTitle: '今天有什么可以帮你?',
    emptySub: '回复会边生成边显示。对话只保存在这个浏览器里。',
    suggest1: '用表格说明 TCP 和 UDP 的区别',
    suggest2: '写一个合并两个有序列表的 Python 函数',
    suggest3: '总结 Transformer 架构的核心思想',
    suggest4: '一步步解方程 x² − 5x + 6 = 0',
    settingsTitle: '设置',
    convSettings: '当前对话',
    uiSettings: '界面',
    systemPrompt: '系统提示词',
    systemPromptPlaceholder: '给模型的额外指令(留空则使用服务器默认值)',
    temperature: '温度 (temperature)',
    topP: 'Top P',
    maxTokens: '最大 tokens',
    serverDefault: '默认',
    resetDefaults: '恢复默认',
    save: '保存',
    close: '关闭',
    paramSystem: '系统提示词',
    paramsShown: '当前对话的参数',
    errorTitle: '错误',
    'code.bad_request': '请求无效',
    'code.unknown_model': '未知模型',
    'code.provider_unavailable': '模型不可用',
    'code.busy': '正忙',
    'code.upstream_error': '模型出错',
    'code.rate_limited': '请求过于频繁',
    'code.upstream_timeout': '模型响应超时',
    'code.internal_error': '服务器错误',
    'code.shutting_down': '服务器正在重启',
    'code.session_expired': '对话已关闭',
    'code.unauthorized': '需要登录',
    'code.forbidden_origin': '此站点不允许访问',
    'code.not_found': '未找到',
    'code.restore_failed': '无法恢复',
    'code.http_error': '请求失败',
    'code.too_large': '内容过大',
    errBusy: '上一条回复还在生成。请先停止或等待它结束。',
    errRestore: '服务器已丢失这个对话,已用浏览器中的记录恢复。',
    errRestoreFailed: '服务器已丢失这个对话,且无法恢复:{message}',
    errSessionExpired: '服务器关闭了这个对话,正在重新连接…',
    errNetwork: '请求无法到达服务器。',
    errEditOld: '这条消息太早,服务器上已无法编辑。',
    errUnknown: '出错了。',
    loginTitle: '登录 · NexLM',
    loginHeading: '登录 NexLM',
    loginSub: '此服务器需要访问令牌。',
    loginToken: '访问令牌',
    loginSubmit: '登录',
    loginWrong: '令牌无效。',
  },
};

const LANGS = Object.keys(STRINGS);
let current = 'en';
const listeners = new Set();

/** 'zh' for any Chinese browser language, else 'en'. */
export function browserLang() {
  const prefs = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language || 'en'];
  for (const l of prefs) {
    const base = String(l).toLowerCase().split('-')[0];
    if (LANGS.includes(base)) return base;
  }
  return 'en';
}

export function getLang() {
  return current;
}

/** `choice`: 'auto', 'en' or 'zh'. */
export function setLang(choice) {
  const next = LANGS.includes(choice) ? choice : browserLang();
  current = next;
  document.documentElement.lang = next === 'zh' ? 'zh-CN' : 'en';
  applyI18n(document);
  for (const fn of listeners) fn(next);
}

export function onLangChange(fn) {
  listeners.add(fn);
}

/** The string for `key` in the current language, with {name} placeholders filled in. */
export function t(key, vars) {
  let s = STRINGS[current][key] ?? STRINGS.en[key] ?? key;
  if (vars) s = s.replace(/\{(\w+)\}/g, (m, k) => (vars[k] !== undefined ? String(vars[k]) : m));
  return s;
}

export function applyI18n(root) {
  for (const el of root.querySelectorAll('[data-i18n]')) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll('[data-i18n-attr]')) {
    for (const pair of el.dataset.i18nAttr.split(';')) {
      const [attr, key] = pair.split(':').map((x) => x.trim());
      if (attr && key) el.setAttribute(attr, t(key));
    }
  }
}
