/**
 * The page from the model: the conversation list and the open conversation's
 * messages. Elements are kept by key and updated in place, so a new message or a
 * changed mark does not rebuild the list under the keyboard's focus. Every text from
 * the network goes in through textContent, never as HTML.
 */
import type { ChatModel, Conversation, Item, Mark } from "./model.js";
import { parseNotice } from "./notices.js";

export function $(id: string): HTMLElement {
  const element = document.getElementById(id);
  if (element === null) throw new Error(`the page has no #${id}`);
  return element;
}

export function element<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className = "",
  text?: string,
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const MARK_TEXT: Record<Mark, [string, string]> = {
  sending: ["…", "sending"],
  sent: ["✓", "sent"],
  delivered: ["✓✓", "delivered"],
  read: ["✓✓ read", "read"],
  failed: ["! not sent", "failed"],
};

/** What the page's controls ask of the app. */
export interface ViewHandlers {
  /** Thumbnails and file links are read with the token: the page asks for blob: URLs. */
  loadBlob: (url: string, mime?: string) => Promise<string>;
  open: (key: string) => void;
  acknowledge: (sos: number, button: HTMLButtonElement) => void;
  edit: (item: Item) => void;
  recall: (item: Item) => void;
}

/** Bytes as people read them: 930 B, 4.5 KiB, 1.2 MiB. */
export function humanSize(size: number): string {
  if (size < 1024) return `${size} B`;
  const units = ["KiB", "MiB", "GiB"];
  let value = size / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(1)} ${units[unit]}`;
}

export class ChatView {
  private readonly listItems = new Map<string, HTMLLIElement>();
  private readonly messageItems = new Map<string, HTMLLIElement>();
  private shownConversation: string | undefined;
  private readonly loadedThumbs = new Set<string>();

  constructor(
    private readonly model: ChatModel,
    private readonly handlers: ViewHandlers,
  ) {}

  reset(): void {
    this.listItems.clear();
    this.messageItems.clear();
    this.shownConversation = undefined;
    $("conversations").replaceChildren();
    $("messages").replaceChildren();
    for (const strip of ["alarms", "invitations"]) {
      $(strip).replaceChildren();
      $(strip).hidden = true;
    }
  }

  /** The conversation list: newest activity first, unread badges, previews. */
  renderList(): void {
    const list = $("conversations");
    const sorted = this.model.sorted();
    const focusedKey = (document.activeElement as HTMLElement | null)?.dataset?.["key"];
    sorted.forEach((conversation, index) => {
      let li = this.listItems.get(conversation.key);
      if (li === undefined) {
        li = this.listEntry(conversation);
        this.listItems.set(conversation.key, li);
      }
      this.fillEntry(li, conversation);
      if (list.children[index] !== li) list.insertBefore(li, list.children[index] ?? null);
    });
    if (focusedKey !== undefined && document.activeElement === document.body) {
      this.listItems.get(focusedKey)?.querySelector("button")?.focus();
    }
    $("no-conversations").hidden = sorted.length > 0;
    const total = this.model.totalUnread();
    const badge = $("total-unread");
    badge.hidden = total === 0;
    badge.textContent = String(total);
    document.title = total ? `(${total}) cim chat` : "cim chat";
  }

  private listEntry(conversation: Conversation): HTMLLIElement {
    const li = element("li");
    li.dataset["key"] = conversation.key;
    const button = element("button", "conversation-button");
    button.type = "button";
    button.dataset["key"] = conversation.key;
    button.append(element("span", "title"), element("span", "badge unread"), element("span", "preview"));
    button.addEventListener("click", () => this.handlers.open(conversation.key));
    li.append(button);
    return li;
  }

  private fillEntry(li: HTMLLIElement, conversation: Conversation): void {
    const button = li.querySelector("button")!;
    const unread = button.querySelector<HTMLElement>(".unread")!;
    button.querySelector(".title")!.textContent = conversation.title;
    button.querySelector(".preview")!.textContent = conversation.preview;
    unread.textContent = String(conversation.unread);
    unread.hidden = conversation.unread === 0;
    unread.setAttribute("aria-label", `${conversation.unread} unread`);
    button.setAttribute("aria-current", String(this.model.open === conversation.key));
    button.setAttribute(
      "aria-label",
      `${conversation.title}${conversation.unread ? `, ${conversation.unread} unread` : ""}: ${conversation.preview}`,
    );
  }

  /** The open conversation's messages, in timeline order. */
  renderMessages(): void {
    const key = this.model.open;
    const list = $("messages");
    if (key !== this.shownConversation) {
      list.replaceChildren();
      this.messageItems.clear();
      this.shownConversation = key;
    }
    if (key === undefined) return;
    const conversation = this.model.conversations.get(key);
    if (conversation === undefined) return;
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    let added = false;
    conversation.items.forEach((item, index) => {
      let li = this.messageItems.get(item.key);
      if (li === undefined) {
        li = this.messageEntry(item, conversation);
        this.messageItems.set(item.key, li);
        added = true;
      }
      this.fillMessage(li, item);
      if (list.children[index] !== li) list.insertBefore(li, list.children[index] ?? null);
    });
    if (atBottom || (added && conversation.items[conversation.items.length - 1]?.mine)) list.scrollTop = list.scrollHeight;
  }

  private messageEntry(item: Item, conversation: Conversation): HTMLLIElement {
    const li = element("li", `msg ${item.mine ? "mine" : "theirs"} ${item.kind}`);
    li.dataset["key"] = item.key;
    if (conversation.group && !item.mine) li.append(element("span", "from", item.from));
    if (item.kind === "system") {
      const notice = parseNotice(item.text);
      if (notice.priority === "high") li.classList.add("high");
      li.append(element("span", "text", notice.summary));
    } else if (item.kind === "image" || item.kind === "file") {
      li.append(element("span", "text", `${item.kind === "image" ? "Image" : "File"}: ${item.media?.name || item.text || "file"}`));
      const bar = element("progress");
      bar.max = 100;
      bar.setAttribute("aria-label", "Upload progress");
      li.append(bar);
    } else {
      li.append(element("span", "text", item.text));
    }
    const meta = element("span", "meta");
    const edited = element("span", "edited", "(edited)");
    edited.hidden = true;
    meta.append(edited, element("time", "time", new Date(item.at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })));
    if (item.via) {
      // Sent by this user from another device (the CLI, a phone): said, not hidden.
      const via = element("span", "via", `via ${item.via}`);
      via.title = `Sent from your device ${item.via}`;
      meta.prepend(via);
    }
    if (item.mine) meta.append(element("span", "mark"));
    li.append(meta);
    if (item.mine && item.kind !== "system") meta.prepend(this.actions(item));
    return li;
  }

  /** Edit (text messages) and Recall for one's own messages, once the node named them. */
  private actions(item: Item): HTMLElement {
    const actions = element("span", "actions");
    const make = (label: string, name: string, act: (item: Item) => void) => {
      const button = element("button", `action ${name}`, label);
      button.type = "button";
      button.setAttribute("aria-label", `${label} this message`);
      button.addEventListener("click", () => act(item));
      return button;
    };
    if (item.kind === "text") actions.append(make("Edit", "edit", this.handlers.edit));
    actions.append(make("Recall", "recall", this.handlers.recall));
    actions.hidden = true;
    return actions;
  }

  private fillMessage(li: HTMLLIElement, item: Item): void {
    li.dataset["msgId"] = item.msgId;
    const text = li.querySelector<HTMLElement>(".text");
    if (item.recalled) {
      li.classList.add("recalled");
      if (text !== null) text.textContent = item.mine ? "You recalled this message" : "Message recalled";
      for (const gone of li.querySelectorAll(".thumb, .download, progress")) gone.remove();
    } else if (item.kind === "text" && text !== null) {
      text.textContent = item.text;
    } else if ((item.kind === "image" || item.kind === "file") && text !== null && item.media !== undefined) {
      text.textContent = `${item.kind === "image" ? "Image" : "File"}: ${item.media.name || "file"} (${humanSize(item.media.size)})`;
    }
    const edited = li.querySelector<HTMLElement>(".edited");
    if (edited !== null) edited.hidden = !item.edited || item.recalled;
    const actions = li.querySelector<HTMLElement>(".actions");
    if (actions !== null) actions.hidden = item.recalled || item.msgId === "0" || item.mark === "failed";
    const mark = li.querySelector<HTMLElement>(".mark");
    if (mark !== null && item.mark !== undefined) {
      const [text, label] = MARK_TEXT[item.mark];
      mark.textContent = text;
      mark.dataset["mark"] = item.mark;
      mark.setAttribute("aria-label", label);
      li.dataset["mark"] = item.mark;
    }
    const bar = li.querySelector("progress");
    if (bar !== null) {
      bar.hidden = item.progress === undefined;
      if (item.progress !== undefined) bar.value = Math.round(item.progress * 100);
    }
    const media = item.media;
    if (media !== undefined && !item.recalled && item.progress === undefined && !this.loadedThumbs.has(item.key)) {
      this.loadedThumbs.add(item.key);
      this.attachMedia(li, item);
    }
  }

  private attachMedia(li: HTMLLIElement, item: Item): void {
    const media = item.media!;
    const link = element("a", "download", "Download");
    link.href = "#";
    link.download = media.name || "file";
    link.addEventListener("click", (event) => {
      if (link.dataset["ready"]) return;
      event.preventDefault();
      void this.handlers.loadBlob(media.url, media.mime).then((url) => {
        link.href = url;
        link.dataset["ready"] = "1";
        link.click();
      });
    });
    if (item.kind === "image" && (media.thumbnailUrl || media.url)) {
      const img = element("img", "thumb");
      img.alt = media.name || "image";
      if (media.width && media.height) {
        img.width = Math.min(media.width, 240);
        img.height = Math.round((img.width * media.height) / media.width);
      }
      li.insertBefore(img, li.querySelector(".meta"));
      this.handlers
        .loadBlob(media.thumbnailUrl || media.url)
        .then((url) => {
          img.src = url;
        })
        .catch(() => {
          img.alt = `${img.alt} (could not be loaded)`;
        });
    }
    li.insertBefore(link, li.querySelector(".meta"));
  }

  /** Who is typing in the open conversation, in one line (empty: nobody). */
  renderTyping(users: readonly string[]): void {
    const line = $("typing");
    const text = users.length === 0 ? "" : users.length === 1 ? `${users[0]} is typing…` : `${users.join(", ")} are typing…`;
    if (line.textContent !== text) line.textContent = text;
  }

  /** A group invitation with its Accept and Decline buttons; `answered` removes it. */
  invitation(group: string, text: string, answer: (accept: boolean) => Promise<void>): void {
    const strip = $("invitations");
    if (strip.querySelector(`[data-group="${CSS.escape(group)}"]`) !== null) return;
    const entry = element("div", "invitation");
    entry.dataset["group"] = group;
    entry.append(element("span", "invitation-text", text));
    for (const [label, accept] of [
      ["Accept", true],
      ["Decline", false],
    ] as const) {
      const button = element("button", "", label);
      button.type = "button";
      button.addEventListener("click", () => {
        for (const b of entry.querySelectorAll("button")) b.disabled = true;
        void answer(accept).then(
          () => {
            entry.remove();
            strip.hidden = strip.childElementCount === 0;
          },
          () => {
            for (const b of entry.querySelectorAll("button")) b.disabled = false;
          },
        );
      });
      entry.append(button);
    }
    strip.append(entry);
    strip.hidden = false;
  }

  /** An SOS for a guardian: on top of everything, with its acknowledge button. */
  alarm(sos: number, summary: string, handled: boolean): void {
    const alarms = $("alarms");
    let entry = alarms.querySelector<HTMLElement>(`[data-sos="${sos}"]`);
    if (entry === null) {
      entry = element("div", "alarm");
      entry.dataset["sos"] = String(sos);
      entry.setAttribute("role", "alert");
      entry.append(element("span", "alarm-text", summary));
      const button = element("button", "", "Acknowledge");
      button.type = "button";
      button.addEventListener("click", () => this.handlers.acknowledge(sos, button));
      entry.append(button);
      alarms.prepend(entry);
    }
    if (handled) {
      entry.classList.add("handled");
      const button = entry.querySelector("button");
      if (button !== null) button.remove();
      entry.querySelector(".alarm-text")!.textContent = summary;
      entry.removeAttribute("role");
    }
    alarms.hidden = false;
  }
}
